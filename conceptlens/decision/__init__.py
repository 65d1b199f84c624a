"""Decision modes of a class: per-image unit contributions and their tree (Zhang et al. 2019).

``decision_tree(model, data, layer, target)`` explains one class's logit at one layer as a tree of
rationales; :meth:`DecisionTreeResult.route` assigns new images to a mode.
"""

from .contributions import Contributions, unit_contributions
from .tree import UNLABELLED, DecisionTreeResult, decision_tree

__all__ = ["decision_tree", "DecisionTreeResult", "unit_contributions", "Contributions", "UNLABELLED"]
