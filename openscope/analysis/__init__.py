"""Chat-behaviour analyses: read behaviour out of a model with contrast directions and dictionaries.

One module per `openscope chat` command: `contrast` (harmful vs harmless directions, AUROC, latent
tests), `ablate` (remove or add a direction), `jailbreak` (templates along the direction), `sweep`
(steering strength against coherence), `cot` (is the answer readable before it is written), `diff`
(one dictionary on two checkpoints) and `roles` (latents specific to a chat role). `common` holds
their shared run settings and the last-prompt-token forward; `stats` the statistics (DeLong AUROC,
Welch's t, Benjamini–Hochberg). Every report goes through `openscope.reports`.
"""
