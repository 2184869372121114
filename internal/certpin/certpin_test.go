package certpin

import (
	"crypto/sha1"
	"crypto/sha256"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseFormatsAndMatches(t *testing.T) {
	der := []byte("not really DER, any bytes hash the same way")
	s1 := sha1.Sum(der)
	s256 := sha256.Sum256(der)
	print1, print256 := Thumbprints(der)

	for _, in := range []string{print1, strings.ToLower(print1), strings.ReplaceAll(print1, ":", ""), " " + strings.ReplaceAll(print1, ":", "-") + " "} {
		p, err := Parse(in)
		require.NoError(t, err, in)
		assert.Equal(t, Pin(s1[:]), p)
		assert.Equal(t, print1, p.String(), "normalised to upper case with colons")
		assert.True(t, p.Matches(der))
		assert.False(t, p.Matches(append([]byte{0}, der...)))
	}
	p, err := Parse(print256)
	require.NoError(t, err)
	assert.Equal(t, Pin(s256[:]), p)
	assert.True(t, p.Matches(der))
}

func TestParseRejects(t *testing.T) {
	for _, in := range []string{"", "zz", "AB:CD", strings.Repeat("AB", 21), strings.Repeat("AB", 20) + "A"} {
		_, err := Parse(in)
		assert.Error(t, err, in)
	}
	assert.False(t, Pin{1, 2, 3}.Matches([]byte("x")), "a pin of no known length matches nothing")
}
