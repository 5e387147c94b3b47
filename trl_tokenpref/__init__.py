"""Token-level preference optimisation trainers (TDPO, TGDPO, TBPO) for TRL."""
