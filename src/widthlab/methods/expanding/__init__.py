"""Self-expanding networks (Mitchell et al. 2023): grow neurons and layers by the natural expansion score.

Statistics (``kfac``) are separate from solvers (``natural_gradient``, ``kfac_optimizer``) and from the
pure scores (``scores``); proposals, insertion and the controller follow propose -> evaluate -> commit.
"""
