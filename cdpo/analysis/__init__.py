"""Critical-token analysis: rollout verification, with/without-critical-token pass@k, agreement of
contrastive estimation with the rollout critical tokens, and an HTML token viewer.

    rollout    resample continuations after each prefix of an incorrect trajectory; the critical token
    report     pass@k curves (with vs without the critical token) and the agreement table
    figures    the pass@k plot (matplotlib)
    viewer     a self-contained HTML page of scored trajectories (and a headless-Chromium screenshot)
    tokens     per-token text pieces and reasoning-line numbers
    run        what `python rollout.py` does, in order
"""
