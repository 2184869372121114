// Package childenv builds the environment of the programs the workers run (qemu-img,
// qemu-nbd, nbdkit). They get what they need to run and no more: the workers' own
// environment may hold secrets (DISKFERRY_VCENTER_PASSWORD set directly, a DSN), and
// anything a long-lived child holds can be read from /proc/<pid>/environ by its user.
package childenv

import (
	"os"
	"strings"
)

// kept are the variables children inherit: where to find programs and write temporary
// files, the locale for their messages, and the proxy settings the worker itself follows,
// so nbdkit's curl reaches vCenter the way the worker does.
var kept = map[string]bool{
	"PATH": true, "HOME": true, "TMPDIR": true, "TZ": true, "LANG": true, "LANGUAGE": true,
	"http_proxy": true, "https_proxy": true, "no_proxy": true,
	"HTTP_PROXY": true, "HTTPS_PROXY": true, "NO_PROXY": true,
}

// Environ returns the environment for a child process, from the worker's own.
func Environ() []string {
	return Filter(os.Environ())
}

// Filter keeps the entries of env that a child may see. The result is never nil: a nil
// exec.Cmd.Env would hand the child the worker's whole environment.
func Filter(env []string) []string {
	out := []string{}
	for _, kv := range env {
		name, _, ok := strings.Cut(kv, "=")
		if !ok {
			continue
		}
		if kept[name] || strings.HasPrefix(name, "LC_") {
			out = append(out, kv)
		}
	}
	return out
}
