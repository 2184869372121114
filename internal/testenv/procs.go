package testenv

import (
	"bytes"
	"os"
	"strconv"
	"strings"
)

// ProcStat is what a test needs of /proc/<pid>/stat.
type ProcStat struct {
	PID   int
	PPID  int
	Comm  string // the command name, at most 15 bytes
	State string // "R", "S", "Z" (exited, not yet reaped), ...
}

// ReadProcStat reads pid's /proc stat; false when the process is gone.
func ReadProcStat(pid int) (ProcStat, bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return ProcStat{}, false
	}
	// The command name in parentheses may hold spaces; the fields after it do not.
	open, end := bytes.IndexByte(b, '('), bytes.LastIndexByte(b, ')')
	if open < 0 || end < open {
		return ProcStat{}, false
	}
	fields := strings.Fields(string(b[end+1:]))
	if len(fields) < 2 {
		return ProcStat{}, false
	}
	ppid, err := strconv.Atoi(fields[1])
	if err != nil {
		return ProcStat{}, false
	}
	return ProcStat{PID: pid, PPID: ppid, Comm: string(b[open+1 : end]), State: fields[0]}, true
}

// allProcs lists every process's stat.
func allProcs() []ProcStat {
	entries, _ := os.ReadDir("/proc")
	var out []ProcStat
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if st, ok := ReadProcStat(pid); ok {
			out = append(out, st)
		}
	}
	return out
}

// LiveChildren lists pid's children running command comm, zombies left out.
func LiveChildren(pid int, comm string) []int {
	var out []int
	for _, st := range allProcs() {
		if st.PPID == pid && st.Comm == comm && st.State != "Z" {
			out = append(out, st.PID)
		}
	}
	return out
}
