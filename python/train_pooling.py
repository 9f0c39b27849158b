"""Multiple-instance learning with HopfieldPooling on bags of real Fashion-MNIST images.

A bag holds --bag-size images; it is positive when at least one of them is of
the --target class (default 8, "Bag").  Each image is embedded by a small MLP,
HopfieldPooling's learned state pattern retrieves from the bag's embeddings
(the bag is the Hopfield layer's bank), and a linear head classifies the
pooled pattern.  The seed's immune-repertoire application is the same shape
of problem with much larger bags.

    python python/train_pooling.py                       # fused kernels (the automatic backend)
    python python/train_pooling.py --backend torch       # the reference path, for comparison
    python python/train_pooling.py --similarity l2 --heads 4

Fashion-MNIST comes from the Debian package dataset-fashion-mnist
(/usr/share/datasets/fashion-mnist); --data-dir or $FASHION_MNIST_DIR point elsewhere.
"""
from __future__ import annotations

import argparse
import gzip
import os
import time

import numpy as np
import torch
from torch import nn

import hen_kernels as hk

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"


def load_fashion_mnist(data_dir: str, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 784) float32 in [0, 1] and labels (N,) int64 from the gzipped IDX files."""
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz"), "rb") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28 * 28)
    with gzip.open(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz"), "rb") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    return torch.from_numpy(images.astype(np.float32) / 255.0), torch.from_numpy(labels.astype(np.int64))


def make_bags(images, labels, n_bags: int, bag_size: int, target: int, gen: torch.Generator):
    """Bags (n_bags, bag_size, 784) and bag labels: half the bags hold 1..3 target images, half none."""
    is_target = labels == target
    pos_pool, neg_pool = torch.nonzero(is_target).squeeze(1), torch.nonzero(~is_target).squeeze(1)
    idx = neg_pool[torch.randint(len(neg_pool), (n_bags, bag_size), generator=gen)]
    y = torch.arange(n_bags) % 2
    for b in torch.nonzero(y).squeeze(1).tolist():
        k = int(torch.randint(1, 4, (1,), generator=gen))
        slots = torch.randperm(bag_size, generator=gen)[:k]
        idx[b, slots] = pos_pool[torch.randint(len(pos_pool), (k,), generator=gen)]
    perm = torch.randperm(n_bags, generator=gen)
    return images[idx[perm]], y[perm].float()


class MILModel(nn.Module):
    def __init__(self, embed: int, heads: int, similarity: str, backend, steps: int):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, embed), nn.ReLU())
        self.pool = hk.nn.HopfieldPooling(input_size=embed, hidden_size=16, num_heads=heads, quantity=1,
                                          similarity=similarity, scaling=1.0 if similarity == "l2" else None,
                                          update_steps_max=steps, backend=backend)
        self.head = nn.Linear(embed, 1)

    def forward(self, bags: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.encoder(bags))).squeeze(-1)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("FASHION_MNIST_DIR", DEFAULT_DIR))
    ap.add_argument("--bags", type=int, default=2000, help="training bags (as many again for testing, /4)")
    ap.add_argument("--bag-size", type=int, default=32)
    ap.add_argument("--target", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--embed", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=0, help="update_steps_max of the pooling layer")
    ap.add_argument("--similarity", default="dot", choices=["dot", "l2", "l2sq"])
    ap.add_argument("--backend", default=None, help="hen_kernels backend (default: automatic)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    images, labels = load_fashion_mnist(args.data_dir, "train")
    test_images, test_labels = load_fashion_mnist(args.data_dir, "test")
    x_train, y_train = make_bags(images, labels, args.bags, args.bag_size, args.target, gen)
    x_test, y_test = make_bags(test_images, test_labels, max(2, args.bags // 4), args.bag_size, args.target, gen)
    dev = torch.device(args.device)
    x_train, y_train, x_test, y_test = (t.to(dev) for t in (x_train, y_train, x_test, y_test))

    model = MILModel(args.embed, args.heads, args.similarity, args.backend, args.steps).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.BCEWithLogitsLoss()
    history = []
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=gen).to(dev)
        total = 0.0
        for i in range(0, len(order), args.batch_size):
            batch = order[i:i + args.batch_size]
            loss = loss_fn(model(x_train[batch]), y_train[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(batch)
        model.eval()
        with torch.no_grad():
            acc = ((model(x_test) > 0).float() == y_test).float().mean().item()
        history.append(dict(epoch=epoch + 1, loss=total / len(order), test_accuracy=acc))
        if not args.quiet:
            print(f"epoch {epoch + 1}: train loss {total / len(order):.4f}  test accuracy {acc:.3f}  "
                  f"({time.perf_counter() - t0:.1f} s)")
    return dict(history=history, seconds=time.perf_counter() - t0)


if __name__ == "__main__":
    main()
