"""hflayers' bit-pattern and latch-sequence examples, run on hk.nn: only the import differs from hflayers.

Both tasks are binary classification of a set (a bag, or a sequence) of instances:

* ``bit_pattern``: each bag holds --instances random bit strings of --bits bits;
  a positive bag also holds one of --signals "signal" strings that negative bags
  never contain (multiple-instance learning).
* ``latch_sequence``: each sample is a sequence of --instances one-hot characters out of
  --characters; the first character is 0 or 1 and is the label, every later one is
  drawn from the other characters, so the network must latch on to the first.

Six networks per task, the ones hflayers' example notebooks build, written the way
those notebooks use the modules (``Sequential``, ``output_size``, writing the training
set's unique instances into ``lookup_weights``):

    hopfield           Hopfield(input_size) -> Flatten -> Linear(output_size * instances, 1)
    hopfield_adapted   ... with hidden_size=8, num_heads=8, update_steps_max=3, scaling=0.25, dropout=0.5
    pooling            HopfieldPooling(input_size) -> Linear(output_size, 1)
    pooling_adapted    ... with the adapted arguments
    lookup             HopfieldLayer(input_size, quantity=#unique instances) -> Flatten -> Linear
    lookup_adapted     ... lookup_weights_as_separated=True, lookup_targets_as_trainable=False,
                       the lookup table initialised with the unique training instances

    python python/hflayers_sets.py --task latch_sequence
    python python/hflayers_sets.py --task bit_pattern --networks pooling lookup --epochs 20
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.nn import Flatten, Linear, Sequential
from torch.nn.functional import binary_cross_entropy_with_logits
from torch.nn.utils import clip_grad_norm_

from hen_kernels.nn import Hopfield, HopfieldLayer, HopfieldPooling  # hflayers: from hflayers import ...

NETWORKS = ("hopfield", "hopfield_adapted", "pooling", "pooling_adapted", "lookup", "lookup_adapted")
ADAPTED = dict(hidden_size=8, num_heads=8, update_steps_max=3, scaling=0.25, dropout=0.5)


def bit_pattern_set(bags: int, instances: int, signals: int, bits: int, gen: torch.Generator):
    """Bags (bags, instances, bits) of 0/1 floats and labels (bags,): the first half positive."""
    sig = torch.empty(0, bits, dtype=torch.int64)
    while len(sig) < signals:  # distinct, non-zero signal strings
        cand = torch.randint(0, 2, (signals, bits), generator=gen)
        sig = torch.cat([sig, cand[cand.sum(1) > 0]]).unique(dim=0)[:signals]
    data = torch.randint(0, 2, (bags, instances, bits), generator=gen)
    while True:  # no background instance is all-zero or equal to a signal
        bad = (data.sum(-1) == 0) | (data.unsqueeze(2) == sig).all(-1).any(-1)
        if not bad.any():
            break
        data[bad] = torch.randint(0, 2, (int(bad.sum()), bits), generator=gen)
    labels = (torch.arange(bags) < bags // 2).long()
    for b in range(bags // 2):
        slot = int(torch.randint(instances, (1,), generator=gen))
        data[b, slot] = sig[int(torch.randint(len(sig), (1,), generator=gen))]
    return data.float(), labels.float()


def latch_sequence_set(samples: int, instances: int, characters: int, gen: torch.Generator):
    """One-hot sequences (samples, instances, characters) whose first character (0 or 1) is the label."""
    chars = torch.randint(2, characters, (samples, instances), generator=gen)
    labels = torch.randint(0, 2, (samples,), generator=gen)
    chars[:, 0] = labels
    return torch.nn.functional.one_hot(chars, characters).float(), labels.float()


def build(name: str, width: int, instances: int, unique: torch.Tensor) -> Sequential:
    """The network ``name`` over instances of ``width`` features, as hflayers' notebooks build it."""
    adapted = ADAPTED if name.endswith("_adapted") else {}
    if name.startswith("hopfield"):
        hopfield = Hopfield(input_size=width, **adapted)
        output_projection = Linear(in_features=hopfield.output_size * instances, out_features=1)
        return Sequential(hopfield, Flatten(), output_projection, Flatten(start_dim=0))
    if name.startswith("pooling"):
        hopfield_pooling = HopfieldPooling(input_size=width, **adapted)
        output_projection = Linear(in_features=hopfield_pooling.output_size, out_features=1)
        return Sequential(hopfield_pooling, output_projection, Flatten(start_dim=0))
    separated = dict(lookup_weights_as_separated=True, lookup_targets_as_trainable=False) if adapted else {}
    hopfield_lookup = HopfieldLayer(input_size=width, quantity=len(unique), **separated)
    if adapted:  # start from meaningful stored patterns: the training set's unique instances
        with torch.no_grad():
            hopfield_lookup.lookup_weights[:] = unique.unsqueeze(dim=0)
    output_projection = Linear(in_features=hopfield_lookup.output_size * instances, out_features=1)
    return Sequential(hopfield_lookup, Flatten(start_dim=1), output_projection, Flatten(start_dim=0))


def run_epoch(network, data, labels, batch_size, optimiser=None, gen=None):
    """Mean loss and accuracy over one pass; trains when an optimiser is given."""
    network.train(optimiser is not None)
    order = torch.randperm(len(data), generator=gen) if optimiser is not None else torch.arange(len(data))
    losses, correct = [], 0
    with torch.set_grad_enabled(optimiser is not None):
        for i in range(0, len(data), batch_size):
            idx = order[i:i + batch_size]
            out = network(data[idx])
            loss = binary_cross_entropy_with_logits(out, labels[idx])
            if optimiser is not None:
                optimiser.zero_grad()
                loss.backward()
                clip_grad_norm_(network.parameters(), max_norm=1.0, norm_type=2)
                optimiser.step()
            losses.append(loss.item() * len(idx))
            correct += int(((out > 0).float() == labels[idx]).sum())
    return sum(losses) / len(data), correct / len(data)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=["bit_pattern", "latch_sequence"], default="latch_sequence")
    ap.add_argument("--networks", nargs="+", choices=NETWORKS, default=list(NETWORKS))
    ap.add_argument("--samples", type=int, default=2048, help="bags or sequences (a quarter held out)")
    ap.add_argument("--instances", type=int, default=None, help="per bag / sequence (16 bit, 20 latch)")
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--signals", type=int, default=8)
    ap.add_argument("--characters", type=int, default=6)
    ap.add_argument("--epochs", type=int, default=None, help="(200 bit pattern, 20 latch, as hflayers' notebooks)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    gen = torch.Generator().manual_seed(args.seed)
    if args.task == "bit_pattern":
        data, labels = bit_pattern_set(args.samples, args.instances or 16, args.signals, args.bits, gen)
    else:
        data, labels = latch_sequence_set(args.samples, args.instances or 20, args.characters, gen)
    perm = torch.randperm(len(data), generator=gen)
    held = perm[: len(data) // 4]
    train = perm[len(data) // 4:]
    unique = data[train].reshape(-1, data.shape[-1]).unique(dim=0)

    results = {}
    for name in args.networks:
        torch.manual_seed(args.seed)
        network = build(name, data.shape[-1], data.shape[1], unique)
        optimiser = torch.optim.AdamW(network.parameters(), lr=args.lr)
        history, t0 = [], time.perf_counter()
        for epoch in range(args.epochs or (200 if args.task == "bit_pattern" else 20)):
            loss, acc = run_epoch(network, data[train], labels[train], args.batch_size, optimiser, gen)
            eval_loss, eval_acc = run_epoch(network, data[held], labels[held], args.batch_size)
            history.append(dict(epoch=epoch + 1, loss=loss, accuracy=acc, eval_loss=eval_loss, eval_accuracy=eval_acc))
        results[name] = history
        if not args.quiet:
            h = history[-1]
            print(f"{args.task} {name:17s} epoch {h['epoch']}: train loss {h['loss']:.4f}  eval accuracy "
                  f"{h['eval_accuracy']:.3f}  ({time.perf_counter() - t0:.1f} s)")
    return results


if __name__ == "__main__":
    main()
