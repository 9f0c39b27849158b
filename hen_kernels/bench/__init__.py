"""The benchmark programs behind `make bench` (docs/design.md §6).

    python -m hen_kernels.bench [cpu|bank|nn|gpu|static|crossover|shapes] [--out DIR] [options]    (default cpu)

Each program times the fused kernels against baselines run in the same
process and writes its table as JSON and Markdown under benchmarks/results/:

- ``cpu``: the CPU rows of §6, fused update against plain PyTorch, SDPA, torch.compile and FAISS
  (cpu.{json,md}, cpu.png);
- ``bank``: streamed MemoryBank updates: host bank on a GPU, disk bank, host bank on the CPU (bank.{json,md});
- ``nn``: Hopfield layers, forward and forward+backward, fused against dense plain PyTorch and SDPA /
  MultiheadAttention (nn.{json,md});
- ``gpu``: the GPU rows of §6 in bf16 against SDPA and FlexAttention (gpu.{json,md}, roofline.png);
- ``crossover``: the CPU kernel's hand-written tile products against brgemm by depth and query count,
  the measurements behind the planner's ``hand_up_to`` (crossover.{json,md});
- ``shapes``: the public update against SDPA off the main table's grid: small banks, short rows, many banks,
  forward and as a training step (shapes.{json,md});
- ``static``: the machine-code report, every Triton kernel compiled for sm_80 and sm_90 without a GPU and
  the built CUDA C++ kernels read from the extension (static/static.{json,md}).

``common`` holds what they share (machine description, timing, /proc memory,
number formatting, Markdown tables, report files).  Programs are imported on
demand: importing this package loads none of them.
"""

PROGRAMS = ("cpu", "bank", "nn", "gpu", "static", "crossover", "shapes")
