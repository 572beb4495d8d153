"""The report: what the notebooks compute and show, and the papermill chain that runs them.

Modules, in the order of the notebooks: :mod:`.folders` (where a run writes), :mod:`.context` (model, device,
prompts), :mod:`.session` (the one set-up call of every notebook: ``S = A.setup(globals())``),
:mod:`.layer_names`, :mod:`.outliers` (01), :mod:`.grouping_study` (02), :mod:`.attention_study` (03),
:mod:`.comparison` (04-06: metrics set-up, ablation recipes, paired tables, the paper's Table 2),
:mod:`.eightbit_study` (04's real 8-bit execution of the W8A8 recipes),
:mod:`.calibration_study` (07: calibration-set size, its cause per component, the paper's grid),
:mod:`.paper_protocol` (05's branch for real SD checkpoints), :mod:`.prose` (sentences from the numbers),
:mod:`.plots` (figures), :mod:`.chain` (``python -m dgq_utils.report``) and :mod:`.demo`. Around the chain:
:mod:`.runs` (a run's folder ``outputs/runs/<settings>/`` and its ``run.json``), :mod:`.compare_runs` (its main
numbers beside the committed run's, printed at the end of the chain) and :mod:`.publish` (the explicit command that
makes a run the committed ``figures/`` and ``results/``, declared in ``results/RUN.json``).

The notebooks import this package as one namespace (``from dgq_utils import report as A``); the names below are
the notebook-facing functions of the study modules.
"""
from dgq_utils.report.attention_study import *  # noqa: F401,F403
from dgq_utils.report.calibration_study import *  # noqa: F401,F403
from dgq_utils.report.comparison import *  # noqa: F401,F403
from dgq_utils.report.context import *  # noqa: F401,F403
from dgq_utils.report.eightbit_study import *  # noqa: F401,F403
from dgq_utils.report.folders import *  # noqa: F401,F403
from dgq_utils.report.grouping_study import *  # noqa: F401,F403
from dgq_utils.report.layer_names import *  # noqa: F401,F403
from dgq_utils.report.outliers import *  # noqa: F401,F403
from dgq_utils.report.paper_protocol import *  # noqa: F401,F403
from dgq_utils.report.prose import *  # noqa: F401,F403
from dgq_utils.report.rounding_study import *  # noqa: F401,F403
from dgq_utils.report.session import *  # noqa: F401,F403
