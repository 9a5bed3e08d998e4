"""Everything before training: dataset readers and contracts, the embedded data generator,
OpenImage-MINI sampling, selective-search proposals (Ray), WebDataset shards, FiftyOne browsing.

No torch at module level anywhere in this package, so Ray workers stay light.
"""
