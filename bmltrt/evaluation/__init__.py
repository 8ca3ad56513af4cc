"""How well the method works, measured against exact truth (`bmltrt evaluate ...`).

    metrics.py      confusion counts, Dice/IoU/Sens/Spec/Acc, lesion-wise F1, size groups
    maps.py         per scan, computed once and cached: predicted femur, each method's anomaly map
    tune.py         each method's post-processing chosen on the validation split
    evaluate.py     the plan (models folders x resolutions, baselines) and the run: Table 1's rows
    tables.py       Table 1 / Figure 3 as text, JSON, CSV, Markdown; the paper's numbers
    figure.py       Figure 3 as a PNG (Pillow)
    model_card.py   femur Dice and inpainting L1 against simple fills (the model card)
    autoencoder.py  baseline (b): a convolutional autoencoder (needs torch)
    mkd.py          baseline (c): multiresolution knowledge distillation (needs torch, VGG16 weights)
    cli.py          the `evaluate` command group and `train autoencoder|mkd`

Nothing here is needed by `detect` except `metrics.components`; importing this package
imports nothing heavy.
"""
