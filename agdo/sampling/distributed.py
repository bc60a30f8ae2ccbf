"""Decoding split across the processes of an ``accelerate launch``: each process decodes its own share of
the records, in batches, and every process gets all the outputs back in the records' order.

Shares are contiguous and differ in size by at most one record; they are gathered with
:func:`accelerate.utils.gather_object`, which concatenates the per-process lists in process order, so
uneven shares need no padding (nothing lost, nothing duplicated). Without an accelerator everything is
decoded here, in the same batches as a plain loop over ``range(0, len(records), batch_size)``.

Outputs do not depend on the number of processes as long as a record's output does not depend on its
batch. One case where it does: ``generate`` with a block KV cache (``SamplerConfig.cache`` ``"prefix"`` /
``"dual"``) under dynamic unmasking (``threshold``) or ``alg="origin"``, where the batch's fed window
decides when a row's kept K/V are refreshed (:mod:`agdo.sampling.sampler`) — there generation under several
processes (other batches) can differ from generation in one. Static schedules, early stop included, and
``cache="none"`` keep rows independent (with one generator per row).
"""

from __future__ import annotations

from typing import Callable, Sequence

from tqdm.auto import tqdm

DecodeBatch = Callable[[Sequence, range], list]


def process_share(count: int, accelerator=None) -> range:
    """The indices of ``range(count)`` that this process decodes (all of them without an accelerator)."""
    if accelerator is None:
        return range(count)
    processes, index = accelerator.num_processes, accelerator.process_index
    return range(count * index // processes, count * (index + 1) // processes)


def decode_across_processes(records: Sequence, batch_size: int, decode_batch: DecodeBatch, *,
                            accelerator=None, desc: str = "decode") -> list:
    """One output per record, in the records' order, on every process.

    ``decode_batch(batch, indices)`` gets a batch of at most ``batch_size`` records of this process's share
    and their indices in ``records`` and returns one output per record (any picklable value). The outputs
    depend on the number of processes only if ``decode_batch`` lets a record's output depend on its batch:
    key each record's randomness to its index (e.g. a generator seeded from it), never to the batch.
    ``accelerator``: an ``accelerate.Accelerator`` (or ``PartialState``); the progress bar shows on the
    local main process only.
    """
    share = process_share(len(records), accelerator)
    outputs = []
    show = accelerator is None or accelerator.is_local_main_process
    for start in tqdm(range(share.start, share.stop, batch_size), desc=desc, leave=False, disable=not show):
        indices = range(start, min(start + batch_size, share.stop))
        batch_outputs = list(decode_batch(records[indices.start : indices.stop], indices))
        if len(batch_outputs) != len(indices):  # the order of everything gathered rests on this
            raise ValueError(f"decode_batch returned {len(batch_outputs)} outputs for {len(indices)} records")
        outputs += batch_outputs
    if accelerator is None or accelerator.num_processes == 1:
        return outputs
    from accelerate.utils import gather_object

    return gather_object(outputs)
