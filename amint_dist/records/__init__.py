"""Records a run leaves for someone else to check later: signing keys, the audit trail, their verification."""
