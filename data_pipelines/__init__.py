"""Capture data for fica-jax (record schema and folder layout: `SCHEMA.md`).

schema.py        one record per identity (npz dict of arrays), encode/decode/validate
shards.py        atomic ArrayRecord shard writer + metadata.json
source.py        Grain random-access source over shards (clear errors for broken files)
tfds_builder.py  the same data as a tensorflow_datasets builder (no TensorFlow needed)
transforms.py    augmentations and the pieces of the stages' example functions (fica_jax/stages)
pipeline.py      make_pipeline / CaptureData: host-sharded, shuffled, batched Grain pipelines
synth.py         `fica data synth` driver over synthetic/generator.py
convert.py       `fica data convert` for real-capture folders (--format folder)
multiview.py     `fica data convert --format ava256|multiface`: tracked meshes -> records, PCA codes
formats/         raw readers of the Ava-256 / Goliath and Multiface layouts, PLY and mesh files
crops.py         square crops of images, their intrinsics and per-pixel maps
align.py         face detection and the training portraits' framing rule (`fica generate`)
latents.py       the DiT's latent cache records
contact_sheet.py `fica data inspect`
"""
