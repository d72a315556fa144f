"""The audit: the whole attack (attribution -> pruning -> recovery) and the defense comparison
as one resumable run of independent jobs, ending in results.json and a report."""
