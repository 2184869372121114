package sna

import (
	"fmt"
	"log/slog"
	"sync"

	"github.com/diskferry/diskferry/internal/tunnel"
)

// Tunnels keeps one SSH tunnel per hub (a tunnel.Manager with its pool of SSH
// connections), opened on first use and shared by every backup that copies to that hub.
type Tunnels struct {
	mu        sync.Mutex
	byHub     map[string]*tunnel.Manager
	configFor func(hubID string) (tunnel.Config, error)
	log       *slog.Logger
}

// NewTunnels returns a pool that builds each hub's tunnel config with configFor.
func NewTunnels(configFor func(hubID string) (tunnel.Config, error), log *slog.Logger) *Tunnels {
	return &Tunnels{byHub: map[string]*tunnel.Manager{}, configFor: configFor, log: log}
}

// Get returns the hub's tunnel, creating it on first use.
func (t *Tunnels) Get(hubID string) (*tunnel.Manager, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if m, ok := t.byHub[hubID]; ok {
		return m, nil
	}
	cfg, err := t.configFor(hubID)
	if err != nil {
		return nil, fmt.Errorf("tunnel to hub %q: %w", hubID, err)
	}
	m, err := tunnel.New(cfg, t.log.With("hub", hubID))
	if err != nil {
		return nil, fmt.Errorf("tunnel to hub %q: %w", hubID, err)
	}
	t.byHub[hubID] = m
	return m, nil
}

// Close closes every tunnel.
func (t *Tunnels) Close() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	var first error
	for id, m := range t.byHub {
		if err := m.Close(); err != nil && first == nil {
			first = fmt.Errorf("close tunnel to hub %q: %w", id, err)
		}
		delete(t.byHub, id)
	}
	return first
}
