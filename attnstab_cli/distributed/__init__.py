"""Runs of attnstab over several processes: the process group and the split of the calibration sequences."""
