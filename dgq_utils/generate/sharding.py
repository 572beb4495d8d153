"""Generation sharded over processes and GPUs with HF accelerate: split the images, calibrate once, share the cache.

Launch any script or module that uses this with accelerate (GPUs) or torchrun (CPU processes)::

    accelerate launch --multi_gpu --num_processes 8 my_script.py      # 8 GPUs (NCCL)
    torchrun --nproc_per_node 2 my_script.py                            # 2 CPU processes (gloo)

(``python -m dgq_utils.testing.sharded_run`` is a complete example, used by the tests.)

and, inside, use :func:`process_shard` to learn this process's rank, then

* :func:`quantize_once` -- rank 0 calibrates and saves the state file, the others wait at a barrier and load it,
  so calibration happens once and every rank runs the *same* quantized model;
* :func:`generate_sharded` -- each rank generates its contiguous slice of the (prompt index, seed) items into the
  shared, content-addressed image cache (:mod:`dgq_utils.generate.images`: part files named by pid, merges under
  an ``fcntl`` lock); after a barrier every rank reads the whole manifest.

Because every image is seeded by its own (prompt index, seed) and batches are always run full (see
:mod:`dgq_utils.generate.images`), the images of an N-process run are bit-identical to one process's on the same
device. A killed rank's images are not lost: rerunning skips every image that is already in the cache with a
valid checksum and generates only the rest, whatever the number of processes.

Plain single-process use needs no launcher: :func:`process_shard` then returns rank 0 of 1 and the barriers are
no-ops.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from dgq_utils.config.validation import check_prompts
from dgq_utils.generate.images import GenerationResult, generate_images
from dgq_utils.quantize.pipeline import quantize_pipeline
from dgq_utils.quantize.state import load_quant_state, save_quant_state

__all__ = ["Shard", "process_shard", "generate_sharded", "quantize_once", "launched_world_size"]


def launched_world_size() -> int:
    """The number of processes a launcher (accelerate, torchrun, MPI) started, from its environment (1 if none)."""
    for var in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world_size`` processes (``rank`` 0 is the main one)."""

    rank: int = 0
    world_size: int = 1
    state: Any = field(default=None, compare=False, repr=False)  # accelerate.PartialState when launched

    def __post_init__(self):
        if not (isinstance(self.world_size, int) and self.world_size >= 1):
            raise ValueError(f"Shard(world_size=...) must be an int >= 1, got {self.world_size!r}.")
        if not (isinstance(self.rank, int) and 0 <= self.rank < self.world_size):
            raise ValueError(f"Shard(rank=...) must be in [0, {self.world_size}), got {self.rank!r}.")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def split(self, items: Sequence) -> list:
        """This rank's contiguous slice of ``items`` (the first ``len % world_size`` ranks get one more), the same
        split as accelerate's ``split_between_processes``."""
        items = list(items)
        base, extra = divmod(len(items), self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return items[start:start + base + (self.rank < extra)]

    def barrier(self) -> None:
        """Wait until every process reaches this point (no-op for one process)."""
        if self.state is not None and self.world_size > 1:
            self.state.wait_for_everyone()


def process_shard(device: str = "cpu") -> Shard:
    """This process's :class:`Shard`: from accelerate's ``PartialState`` when a launcher started several
    processes (``device="cpu"`` selects the gloo backend, anything else NCCL on GPUs), else rank 0 of 1."""
    if launched_world_size() <= 1:
        return Shard()
    from accelerate import PartialState

    state = PartialState(cpu=str(device).startswith("cpu"))
    return Shard(int(state.process_index), int(state.num_processes), state)


def generate_sharded(pipe, prompts: Sequence[str], seeds, cache_root, *, shard: Shard | None = None,
                     prompt_indices: Sequence[int] | None = None, progress: bool = True,
                     **kwargs) -> GenerationResult:
    """:func:`~dgq_utils.generate.images.generate_images` with the prompts split across ``shard``'s processes.

    Every rank generates its slice (prompt indices, hence noise, stay those of the full list), then waits for the
    others and returns the :class:`GenerationResult` of *all* requested images (read from the shared cache). Other
    keyword arguments (``recipe``, ``model_id``, ``settings``, ``verify``, ...) go to ``generate_images``; they
    must be the same on every rank.
    """
    shard = shard or Shard()
    prompts = check_prompts(prompts)
    indices = list(range(len(prompts))) if prompt_indices is None else [int(i) for i in prompt_indices]
    if len(indices) != len(prompts):
        raise ValueError(f"prompt_indices has {len(indices)} entries for {len(prompts)} prompts.")
    mine = shard.split(list(zip(indices, prompts)))
    if mine:
        generate_images(pipe, [p for _, p in mine], seeds, cache_root, prompt_indices=[i for i, _ in mine],
                        progress=progress, **kwargs)
    shard.barrier()
    result = generate_images(pipe, prompts, seeds, cache_root, prompt_indices=indices, progress=False,
                             require_cached=True, **kwargs)
    shard.barrier()  # nobody leaves (and, e.g., deletes the cache) while another rank still reads it
    return result


def quantize_once(pipe, recipe, calibration_prompts: Sequence[str], state_path: str | os.PathLike, *,
                  shard: Shard | None = None, **quantize_kwargs):
    """Quantize ``pipe`` with ``recipe`` the same way on every rank, calibrating only once.

    Rank 0 loads ``state_path`` if it exists (a finished earlier run), else calibrates with
    :func:`~dgq_utils.quantize.pipeline.quantize_pipeline` and saves the state there; after a barrier the other
    ranks load it with :func:`~dgq_utils.quantize.state.load_quant_state`. Returns the report of this rank.
    """
    shard = shard or Shard()
    state_path = Path(state_path)
    report = None
    if shard.is_main:
        if state_path.exists():
            report = load_quant_state(pipe, state_path)
        else:
            report = quantize_pipeline(pipe, recipe, check_prompts(calibration_prompts, "calibration_prompts",
                                                                   allow_empty=True), **quantize_kwargs)
            save_quant_state(pipe, state_path)
    shard.barrier()
    if not shard.is_main:
        report = load_quant_state(pipe, state_path)
    return report
