#!/usr/bin/env python
"""Sampling entry point (`torchrun generate.py --mode=sde ...`).

Not implemented yet: the samplers and ADM-format npz writer arrive with the model and generate
issues. Until then this script refuses to run rather than pretend.
"""
import sys

if __name__ == "__main__":
    sys.exit("generate.py is not implemented yet: this checkout has the data pipeline only "
             "(preprocessing/encode.py and the shard reader). See README, 'Status'.")
