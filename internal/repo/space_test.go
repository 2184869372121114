package repo

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestMargin(t *testing.T) {
	const gib = int64(1) << 30
	for _, tc := range []struct {
		in    string
		total int64
		want  int64
	}{
		{"", 10 * gib, gib / 2}, // 5 %
		{"", 100 * gib, gib},    // capped at 1 GiB
		{"", 0, 0},              // an empty file system
		{" 0 ", 100 * gib, 0},   // no margin
		{"512MiB", 100 * gib, gib / 2},
		{"2GiB", gib, 2 * gib},
		{"4096", gib, 4096},
		{"10%", 10 * gib, gib},
		{"2.5%", 100 * gib, 5 * gib / 2},
	} {
		m, err := ParseMargin(tc.in)
		require.NoError(t, err, tc.in)
		assert.Equal(t, tc.want, m.Of(tc.total), "%q of %d", tc.in, tc.total)
	}
	for _, bad := range []string{"-1", "51%", "x%", "1.5GiB", "2GB", "1e3", "9999999TiB"} {
		_, err := ParseMargin(bad)
		assert.ErrorIs(t, err, ErrInvalidMargin, bad)
		assert.ErrorContains(t, err, bad)
	}
}

func TestSpace(t *testing.T) {
	l, err := New(t.TempDir())
	require.NoError(t, err)
	s, err := l.Space()
	require.NoError(t, err)
	assert.Positive(t, s.Total)
	assert.LessOrEqual(t, s.Free, s.Total)
	assert.LessOrEqual(t, s.Used, s.Total)
	_, err = Layout{Root: "/nonexistent/diskferry"}.Space()
	assert.Error(t, err)
}
