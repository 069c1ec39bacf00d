"""LightGBM quantile boosters -> flat numpy tree arrays for `model.evaluate_trees` (training side only)."""

import numpy as np


def _flatten(structure: dict, nodes: list) -> tuple[int, int]:
    """Append the nodes of one tree; returns (index of this node, depth below it)."""
    index = len(nodes)
    if "leaf_value" in structure or "split_feature" not in structure:
        nodes.append([0, 0.0, index, index, float(structure.get("leaf_value", 0.0))])
        return index, 0
    if structure.get("decision_type", "<=") != "<=":
        raise ValueError("only numerical '<=' splits can be exported")
    nodes.append([int(structure["split_feature"]), float(structure["threshold"]), -1, -1, 0.0])
    left, left_depth = _flatten(structure["left_child"], nodes)
    right, right_depth = _flatten(structure["right_child"], nodes)
    nodes[index][2], nodes[index][3] = left, right
    return index, 1 + max(left_depth, right_depth)


def export_boosters(boosters: list) -> dict:
    """Flat arrays of all trees of all boosters (one booster per quantile, in quantile order)."""
    nodes: list = []
    roots, group_starts, depth = [], [], 0
    for booster in boosters:
        group_starts.append(len(roots))
        for tree in booster.dump_model()["tree_info"]:
            root, tree_depth = _flatten(tree["tree_structure"], nodes)
            roots.append(root)
            depth = max(depth, tree_depth)
    table = np.array(nodes, dtype=np.float64)
    return {
        "feature": table[:, 0].astype(np.int32),
        "threshold": table[:, 1],
        "left": table[:, 2].astype(np.int32),
        "right": table[:, 3].astype(np.int32),
        "value": table[:, 4],
        "roots": np.array(roots, dtype=np.int32),
        "group_starts": np.array(group_starts, dtype=np.int64),
        "depth": depth,
    }
