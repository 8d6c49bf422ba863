"""The tiny run config of the end-to-end tests, as a config file for the command line."""

import os

from helpers import tiny_config


def get_config():
    return tiny_config(os.environ["REVAL_TEST_DATA"], num_iterations=4)
