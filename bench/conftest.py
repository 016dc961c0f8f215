import os
import sys

# bench cases import bench.common as a plain module.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
