"""Every number that compares or scores attribution maps (written by hand: the chapters export the modules it names).

- `measures`: maps compared with each other and with ground-truth parts (cosine, positive share, mask share, peak on
  part, area share), summarised with bootstrap intervals.
- `faithfulness`: maps scored by perturbing the pixels they rank first (deletion, insertion, ROAD).
- `randomisation`: the sanity checks that re-explain a changed network or class (the cascading model-parameter
  randomisation test, its efficient variant, the random-logit test).
- `pointing`: the pointing game with a tolerance, and its contrastive version.
- `evaluate`: all of them for a user's explanation, as one tidy table.

Import from the module that holds a name, e.g. `from contrastive_explanations.metrics.measures import cosine`: a
results file's code version then follows only the metrics it uses."""
