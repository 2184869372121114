package nbd

// Busy reports whether a command holds the handle, so a test can act while one runs.
func Busy(h *Handle) bool {
	if h.mu.TryLock() {
		h.mu.Unlock()
		return false
	}
	return true
}
