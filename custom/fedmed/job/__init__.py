"""What a job is: its settings (one source), the names that cross the wire, the round's record types, and what it learns."""
