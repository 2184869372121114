#!/usr/bin/env bash
# Fails when a process of a finished test run is still alive: anything whose command line or
# environment names the run's private temp dir (the Makefile runs `go test` with TMPDIR set to
# it, so every test's temp dirs and every child's inherited TMPDIR point there; processes of
# other runs on the machine never do). Waits up to 10 s for processes that are just exiting.
# Usage: scripts/leftovers.sh DIR
set -uo pipefail
dir=${1:?usage: leftovers.sh DIR}

# scan sets left to the matching live processes, one "pid: command line" per line. Builtins
# only, no command substitution: a forked helper would carry this script's arguments and match
# itself.
scan() {
	left=""
	local p pid stat cmd env
	local -a args vars
	for p in /proc/[0-9]*; do
		pid=${p#/proc/}
		[[ $pid == "$$" ]] && continue
		read -r stat 2>/dev/null <"$p/stat" || continue
		stat=${stat##*) }
		[[ ${stat:0:1} == Z ]] && continue
		mapfile -d '' args 2>/dev/null <"$p/cmdline" || continue
		mapfile -d '' vars 2>/dev/null <"$p/environ" || vars=()
		cmd="${args[*]}"
		env="${vars[*]}"
		if [[ $cmd == *"$dir"* || $env == *"$dir"* ]]; then
			left+="$pid: $cmd"$'\n'
		fi
	done
}

for _ in 1 2 3 4 5 6 7 8 9 10; do
	scan
	[[ -z $left ]] && exit 0
	sleep 1
done
echo "processes of the test run still running after it ended (the tests must stop what they start):" >&2
printf '%s' "$left" >&2
exit 1
