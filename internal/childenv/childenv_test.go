package childenv

import (
	"slices"
	"testing"
)

func TestFilterKeepsOnlyWhatChildrenNeed(t *testing.T) {
	got := Filter([]string{
		"PATH=/usr/bin", "HOME=/root", "TMPDIR=/tmp", "LANG=C.UTF-8", "LC_ALL=C", "TZ=UTC",
		"https_proxy=http://proxy:3128",
		"DISKFERRY_VCENTER_PASSWORD=secret", "DISKFERRY_DB_DSN=user:pw@tcp(db)/x",
		"AWS_SECRET_ACCESS_KEY=x", "LD_PRELOAD=/evil.so", "MALFORMED",
	})
	want := []string{"PATH=/usr/bin", "HOME=/root", "TMPDIR=/tmp", "LANG=C.UTF-8", "LC_ALL=C", "TZ=UTC",
		"https_proxy=http://proxy:3128"}
	if !slices.Equal(got, want) {
		t.Fatalf("Filter = %q, want %q", got, want)
	}
}

func TestEnvironDropsWorkerSecrets(t *testing.T) {
	t.Setenv("DISKFERRY_VCENTER_PASSWORD", "secret")
	t.Setenv("PATH", "/usr/bin")
	env := Environ()
	if !slices.Contains(env, "PATH=/usr/bin") {
		t.Errorf("Environ() lacks PATH: %q", env)
	}
	for _, kv := range env {
		if kv == "DISKFERRY_VCENTER_PASSWORD=secret" {
			t.Fatalf("Environ() passes the vCenter password on: %q", env)
		}
	}
}

func TestFilterOfNothingIsEmptyNotNil(t *testing.T) {
	if got := Filter([]string{"DISKFERRY_VCENTER_PASSWORD=secret"}); got == nil || len(got) != 0 {
		t.Fatalf("Filter = %#v, want an empty non-nil slice (nil means inherit everything)", got)
	}
}
