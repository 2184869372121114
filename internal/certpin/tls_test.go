package certpin

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestFetchAcceptsOnlyThePinnedCertificate(t *testing.T) {
	srv := httptest.NewTLSServer(http.NotFoundHandler())
	t.Cleanup(srv.Close)
	host := strings.TrimPrefix(srv.URL, "https://")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	presented, err := Presented(ctx, host)
	require.NoError(t, err)
	_, print256 := Thumbprints(presented.Raw)
	pin, err := Parse(print256)
	require.NoError(t, err)

	// Self-signed, unknown to any CA: the pin alone decides.
	cert, err := pin.Fetch(ctx, host)
	require.NoError(t, err)
	assert.Equal(t, presented.Raw, cert.Raw)

	other, err := Parse(strings.Repeat("AB:", 31) + "AB")
	require.NoError(t, err)
	_, err = other.Fetch(ctx, host)
	var mismatch *MismatchError
	require.True(t, errors.As(err, &mismatch), "want a MismatchError, got %v", err)
	assert.Equal(t, print256, mismatch.ActualSHA256)
	assert.Contains(t, err.Error(), "does not match the pinned thumbprint")
}
