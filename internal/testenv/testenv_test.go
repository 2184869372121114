package testenv

import "testing"

func TestInCIAcceptsUsualTrueValues(t *testing.T) {
	for _, v := range []string{"true", "TRUE", "True", "1", "yes", "Yes", "on", "ON", "t", "y", " true "} {
		t.Setenv("CI", v)
		if !InCI() {
			t.Errorf("CI=%q: InCI() = false, want true", v)
		}
	}
	for _, v := range []string{"", "false", "0", "no", "off", "maybe"} {
		t.Setenv("CI", v)
		if InCI() {
			t.Errorf("CI=%q: InCI() = true, want false", v)
		}
	}
}
