"""Holds the fairseq ``--user-dir`` folder ``hessopt_adahessian`` (see :mod:`hessopt.integrations.fairseq`)."""
