package sna

// SetRunSignaler makes a's copies tell their runs through s instead of the activity's client.
func SetRunSignaler(a *Activities, s runSignaler) { a.signaler = s }
