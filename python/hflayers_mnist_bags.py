"""hflayers' MNIST-bags example (attention-based deep multiple-instance learning) on hk.nn.

Each bag holds a random number of 28 x 28 images (normal, mean --mean-bag, variance
--var-bag, at least 1); it is positive when it holds an image of class --target.  A
small CNN embeds every image to 500 features and ``HopfieldPooling`` (one learned
state pattern, hidden_size=32, output_size=500) pools the bag into one vector that a
linear layer classifies, as the network of hflayers' notebook does.  Bags have their
own sizes, so they go through one at a time (batch of 1), as there.  The module is
imported from ``hen_kernels.nn``; the rest is what an hflayers user writes
(``HEN_KERNELS_BACKEND=torch`` runs the reference path instead of the fused kernels).

The images are the gzipped IDX files of MNIST or Fashion-MNIST (same format):
Fashion-MNIST from the Debian package dataset-fashion-mnist is the default because it
is on disk offline; point --data-dir (or $MNIST_DIR) at MNIST's files for the original task.

    python python/hflayers_mnist_bags.py
    python python/hflayers_mnist_bags.py --data-dir ~/mnist --epochs 20
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.nn import Conv2d, Linear, MaxPool2d, Module, ReLU, Sequential, Sigmoid
from torch.nn.utils import clip_grad_norm_

from hen_kernels.nn import HopfieldPooling  # hflayers: from hflayers import HopfieldPooling

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_pooling import DEFAULT_DIR, load_fashion_mnist  # noqa: E402  (the IDX reader, shared by the examples)


def make_bags(images, labels, n_bags: int, mean: float, var: float, target: int, gen: torch.Generator):
    """A list of (bag (n, 1, 28, 28), label 0./1.) with n ~ round(N(mean, var)), n >= 1."""
    bags = []
    for _ in range(n_bags):
        n = max(1, int(round(mean + var ** 0.5 * float(torch.randn(1, generator=gen)))))
        idx = torch.randint(len(images), (n,), generator=gen)
        bags.append((images[idx].reshape(n, 1, 28, 28), float((labels[idx] == target).any())))
    return bags


class HopfieldMIL(Module):
    """CNN embedding of each instance, Hopfield pooling over the bag, a linear classifier."""

    def __init__(self):
        super().__init__()
        self.feature_extractor_part1 = Sequential(
            Conv2d(1, 20, kernel_size=5), ReLU(), MaxPool2d(2, stride=2),
            Conv2d(20, 50, kernel_size=5), ReLU(), MaxPool2d(2, stride=2))
        self.feature_extractor_part2 = Sequential(Linear(50 * 4 * 4, 500), ReLU())
        self.hopfield_pooling = HopfieldPooling(input_size=500, hidden_size=32, output_size=500, num_heads=1)
        self.classifier = Sequential(Linear(500, 1), Sigmoid())

    def forward(self, bag: torch.Tensor) -> torch.Tensor:
        h = self.feature_extractor_part1(bag).reshape(-1, 50 * 4 * 4)
        h = self.feature_extractor_part2(h).unsqueeze(0)  # one bag: (1, n, 500)
        return self.classifier(self.hopfield_pooling(h).squeeze(0))  # probability (1,)


def objective(model: HopfieldMIL, bag, label: float):
    p = model(bag).clamp(1e-5, 1 - 1e-5)
    y = torch.tensor([label])
    return -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).sum(), float((p >= 0.5).float().item() == label)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("MNIST_DIR", DEFAULT_DIR))
    ap.add_argument("--train-bags", type=int, default=200)
    ap.add_argument("--test-bags", type=int, default=50)
    ap.add_argument("--mean-bag", type=float, default=10.0)
    ap.add_argument("--var-bag", type=float, default=2.0)
    ap.add_argument("--target", type=int, default=9)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    gen = torch.Generator().manual_seed(args.seed)
    images, labels = load_fashion_mnist(args.data_dir, "train")
    test_images, test_labels = load_fashion_mnist(args.data_dir, "test")
    train = make_bags(images, labels, args.train_bags, args.mean_bag, args.var_bag, args.target, gen)
    test = make_bags(test_images, test_labels, args.test_bags, args.mean_bag, args.var_bag, args.target, gen)

    torch.manual_seed(args.seed)
    model = HopfieldMIL()
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    history, t0 = [], time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        total, correct = 0.0, 0.0
        for i in torch.randperm(len(train), generator=gen).tolist():
            loss, hit = objective(model, *train[i])
            optimiser.zero_grad()
            loss.backward()
            clip_grad_norm_(model.parameters(), max_norm=1.0, norm_type=2)
            optimiser.step()
            total, correct = total + loss.item(), correct + hit
        model.eval()
        with torch.no_grad():
            test_acc = sum(objective(model, *b)[1] for b in test) / len(test)
        history.append(dict(epoch=epoch + 1, loss=total / len(train), accuracy=correct / len(train),
                            test_accuracy=test_acc))
        if not args.quiet:
            print(f"epoch {epoch + 1}: train loss {total / len(train):.4f}  train accuracy {correct / len(train):.3f}"
                  f"  test accuracy {test_acc:.3f}  ({time.perf_counter() - t0:.1f} s)")
    return dict(history=history, seconds=time.perf_counter() - t0)


if __name__ == "__main__":
    main()
