package main

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/diskferry/diskferry/internal/config"
)

// VDDK gets vCenter's host name and port apart, a port other than 443 included.
func TestSNASettingsSplitsVCenterHostAndPort(t *testing.T) {
	for url, want := range map[string]struct {
		host string
		port int
	}{
		"https://vcenter.example.com/sdk":      {"vcenter.example.com", 0},
		"https://vcenter.example.com:8443/sdk": {"vcenter.example.com", 8443},
		"https://[fd00::5]:9443/sdk":           {"fd00::5", 9443},
	} {
		s, err := snaSettings(config.SNA{VCenterURL: url, Transport: config.TransportVDDK, VCenterPassword: "pw"})
		require.NoError(t, err, url)
		assert.Equal(t, want.host, s.VCenterHost, url)
		assert.Equal(t, want.port, s.VCenterPort, url)
		assert.Equal(t, "pw", s.VCenterPassword)
	}
}
