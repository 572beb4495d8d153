"""The paper's evaluation protocols as one command, sharded over processes and GPUs.

``python -m dgq_utils.protocol sd-v1.4 ...`` / ``... sdxl-turbo ...`` (:mod:`~dgq_utils.protocol.cli`), also under
``accelerate launch --num_processes N -m dgq_utils.protocol ...``:

* :mod:`~dgq_utils.protocol.paper` -- the two protocols (model, sampler), the paper's settings x methods x K
  mapped to presets, and the paper's Table 2 (``paper_table2.csv``, the one copy of its numbers);
* :mod:`~dgq_utils.protocol.inputs` -- the local input files, each with where the paper's copy comes from;
* :mod:`~dgq_utils.protocol.run` -- :func:`run_protocol`: sharded generation (calibration once), metrics once on
  rank 0, resumable;
* :mod:`~dgq_utils.protocol.table` -- our numbers [CI] beside the paper's, in Table 2's layout.

It sits above the engine (``evaluate``, ``generate``): it imports them, they never import it; the report may.
"""
from dgq_utils.protocol.paper import PROTOCOLS, paper_table2, plan_entries
from dgq_utils.protocol.run import ProtocolRun, check_run, run_protocol
from dgq_utils.protocol.table import table2_long, table2_wide

__all__ = ["PROTOCOLS", "ProtocolRun", "check_run", "paper_table2", "plan_entries", "run_protocol", "table2_long",
           "table2_wide"]
