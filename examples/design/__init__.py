"""Design decomposition world: synthetic designs, their rendering, grammar scores, Bayes ceilings, data.

Image -> structure map F -> grammar scores and metadata (goal, format, tone), and back. One
module per concept:

- ``vocab``: names and constants (10 goals, 4 formats, 4 layouts, 6 palettes, 19 colour classes
  with the background as class 0, hierarchy levels, grammar names);
- ``tables``: the conditional probabilities through which goal and format shape a design;
- ``latents``: ``sample_latents(rng) -> Latents`` (metadata and the revealed discrete latents);
- ``layout``: ``compose(latents, rng) -> dict``, element placement with independent jitter;
- ``generator``: ``sample_design(seed, index)``, ``sample_designs(count, seed, start)``,
  ``design_latents(design)``; a design dict is the source of truth;
- ``glyphs``: text as glyph blocks (no fonts); ``render``: ``render(designs, size) -> Rendering``
  (RGB uint8, text and image masks, colour classes, hierarchy; ``.structure()`` is F);
- ``filters``: ``distance_transform``, ``gaussian_blur``; ``grammar``: the four scores,
  ``grammar_scores(image, structure) -> (B, 4)``, batched and differentiable;
- ``ceiling``: ``bayes_ceiling()``, ``bayes_predict(latents)``, exact from the tables;
- ``dataset``: ``open_split(root, split) -> DesignData`` (``DesignBatch`` tensors);
  ``build_data``: ``build(out, designs, size, seed, workers)`` and the CLI.

Import the modules (``from design.render import render``); like the other example folders,
this file re-exports nothing.
"""
