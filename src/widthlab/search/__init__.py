"""The search arm of a comparison: Optuna over the width (and optionally the learning rate).

``spec.py`` holds the study file's ``search:`` section, ``driver.py`` asks and tells one Optuna study
per task and seed (each trial an ordinary run), ``pruning.py`` the callback that prunes a trial from
inside its run. Optuna is an optional dependency (``pip install 'widthlab[search]'``).
"""
