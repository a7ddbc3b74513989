"""Fusion weights tuned online (`recserve tune`): a cross-entropy search over small traffic arms.

Each round samples K weight vectors (cem.Search), installs them as experiment arms with a
configured total share (Admin.SetArms), waits for enough joined impressions per arm (the
joiner's output, model_export.joined), scores every arm and control from the users' actions
(reward.py), refits the search distribution on the elites, and promotes the best arm to control
only when its gain clears a one-sided Welch bound (rolling back if control then loses).
Offline side: numpy only, no torch.
"""
