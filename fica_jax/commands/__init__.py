"""The `fica` command line, one module per verb group: each exposes `add_commands(subparsers)`
and keeps only argument parsing and the handler; the work is in the library layers below.

main.py      the `fica` entry point, the compilation cache, one-line errors (exit 2)
data.py      fica data synth | inspect | convert | tfds | cache
train.py     fica train STAGE, fica plan
sample.py    fica sample          generate.py  fica generate
avatar.py    fica avatar | render export.py    fica export
eval.py      fica eval            demo.py      fica demo (its steps: demo_steps.py)
"""
