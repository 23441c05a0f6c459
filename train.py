#!/usr/bin/env python
"""Training entry point (`accelerate launch train.py ...`).

Not implemented yet: SiT, the losses and the training loop arrive with the model and train issues.
Until then this script refuses to run rather than pretend; the shard reader it will use is
`preprocessing.shards.ShardLoader` (see README, "Reading shards").
"""
import sys

if __name__ == "__main__":
    sys.exit("train.py is not implemented yet: this checkout has the data pipeline only "
             "(preprocessing/encode.py and the shard reader). See README, 'Status'.")
