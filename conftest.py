"""Names every docstring example may use without importing them (as in torch's own docs)."""

import numpy as np
import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace: dict) -> None:
    doctest_namespace.update(np=np, torch=torch, nn=nn)
