"""First-order MAML (Finn et al. 2017, section 5.2).

Per task: theta' = SGD^k(theta; support), and the client sends the weighted mean
over tasks of grad_{theta'} L_query(theta'): the meta-gradient with the inner
loop's Jacobian replaced by the identity. Server: Adam, as MAML.
"""

from __future__ import annotations

from fedmeta.common.algorithms.maml import meta_algorithm

ALGORITHM = meta_algorithm("fomaml", first_order=True)
