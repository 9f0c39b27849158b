"""Memory banks too large for one kernel call, streamed through the public partial/merge API.

- :mod:`.memory_bank`: :class:`MemoryBank`, rows added, queried chunk by chunk, saved and loaded;
- :mod:`.storage`: where the rows live (device, host, disk) and how they reach the device;
- :mod:`.file_format`: the bank file's bytes: the checksummed safetensors header page, parsed strictly;
- :mod:`.file_io`: opening (regular files only), the writer's lock, reading, atomic writes;
- :mod:`.sharded`: :class:`ShardedMemoryBank`, one bank over the ranks of a torch.distributed group;
- :mod:`._checks`: the argument checks and progress bar they share.

``docs/memory_bank.md`` is the user's guide.
"""
from .file_format import BankBusyError, BankFileError, FileInfo
from .file_io import read_info
from .memory_bank import CHUNK_BYTES, MemoryBank
from .sharded import ShardedMemoryBank, init_from_env, shard_path

__all__ = [
    "BankBusyError",
    "BankFileError",
    "CHUNK_BYTES",
    "FileInfo",
    "MemoryBank",
    "ShardedMemoryBank",
    "init_from_env",
    "read_info",
    "shard_path",
]
