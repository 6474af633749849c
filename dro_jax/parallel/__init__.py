"""Devices and hosts: the data-parallel mesh, and several processes on one job."""
