package lab

import (
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/diskferry/diskferry/internal/testenv"
)

// DataPlaneProcesses lists live processes (pid: command line) that serve or read this lab's
// data: qemu-nbd on files of its hubs' repositories and nbdkit on its vCenter's datastore.
// After every backup has ended there must be none.
func (l *Lab) DataPlaneProcesses() []string {
	var markers []string
	for _, h := range l.Hubs {
		markers = append(markers, h.RepoRoot)
	}
	if u, err := url.Parse(l.VC.URL); err == nil {
		markers = append(markers, u.Host)
	}
	var found []string
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if e.Name()[0] < '0' || e.Name()[0] > '9' {
			continue
		}
		raw, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || len(raw) == 0 {
			continue
		}
		cmdline := strings.ReplaceAll(strings.TrimRight(string(raw), "\x00"), "\x00", " ")
		if isZombie(e.Name()) {
			continue
		}
		for _, m := range markers {
			if (strings.Contains(cmdline, "qemu-nbd") || strings.Contains(cmdline, "nbdkit")) && strings.Contains(cmdline, m) {
				found = append(found, e.Name()+": "+cmdline)
				break
			}
		}
	}
	return found
}

func isZombie(pid string) bool {
	n, err := strconv.Atoi(pid)
	if err != nil {
		return true
	}
	st, ok := testenv.ReadProcStat(n)
	return !ok || st.State == "Z"
}
