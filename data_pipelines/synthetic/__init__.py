"""Procedural synthetic captures in the record schema: `generator.make_identity(index, cfg, seed)`
with `generator.SynthConfig`; `texture.paint_texture` paints UV albedo; `preview` saves a PNG."""
