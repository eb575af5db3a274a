"""The elastic launcher: one supervisor per node that hosts or joins the store and keeps the node's workers.

``python -m lookahead_dist.elastic --nproc_per_node=4 --nnodes=2 --node_rank=0 --master_addr=HOST
--master_port=29500 --max-restarts=3 train.py ...`` (torchrun's flags). See :mod:`lookahead_dist.elastic.supervisor`
and docs/ELASTIC.md.
"""

from lookahead_dist.elastic.supervisor import Supervisor, main, parse_args

__all__ = ["Supervisor", "main", "parse_args"]
