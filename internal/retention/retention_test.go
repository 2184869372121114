package retention

import (
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var base = time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC) // a Tuesday

// chain returns points finishing at the given offsets from base, each an incremental on
// the one before except the first (full).
func chain(offsets ...time.Duration) []Point {
	points := make([]Point, len(offsets))
	for i, o := range offsets {
		points[i] = Point{ID: string(rune('a' + i)), FinishedAt: base.Add(o)}
		if i > 0 {
			points[i].Parent = points[i-1].ID
		}
	}
	return points
}

func kept(ds []Decision) string {
	var b strings.Builder
	for _, d := range ds {
		if d.Keep {
			b.WriteString(d.ID)
		}
	}
	return b.String()
}

func flattened(ds []Decision) string {
	var b strings.Builder
	for _, d := range ds {
		if d.Flatten {
			b.WriteString(d.ID)
		}
	}
	return b.String()
}

const day = 24 * time.Hour

func TestSelect(t *testing.T) {
	hourly := chain(0, time.Hour, 2*time.Hour, 3*time.Hour, 4*time.Hour, 5*time.Hour)
	// a: Tue 1 Dec, b: Tue 1 Dec later, c: Wed 2 Dec, d: Mon 7 Dec (next ISO week), e: 1 Jan 2027.
	spread := chain(0, 5*time.Hour, day, 6*day, 31*day)
	for _, tc := range []struct {
		name      string
		points    []Point
		policy    Policy
		keep      string
		flatten   string
		reasonsOf map[string][]string
	}{
		{"no points", nil, Policy{KeepLast: 2}, "", "", nil},
		{"no policy keeps all", hourly, Policy{}, "abcdef", "", map[string][]string{"a": {ReasonAll}, "f": {ReasonNewest}}},
		{"keep last 3", hourly, Policy{KeepLast: 3}, "def", "", map[string][]string{"a": {ReasonNotKept}, "d": {"last 3"}, "f": {ReasonNewest, "last 3"}}},
		{"keep last more than there are", hourly, Policy{KeepLast: 10}, "abcdef", "", nil},
		{"newest kept by a policy that keeps nothing else", hourly, Policy{Yearly: 0, Weekly: 0, KeepLast: 1}, "f", "", nil},
		{"daily picks the newest of each day", spread, Policy{Daily: 4}, "bcde", "", map[string][]string{
			"b": {"daily 2026-12-01"}, "c": {"daily 2026-12-02"}, "d": {"daily 2026-12-07"}, "a": {ReasonNotKept}}},
		{"daily counts days with points only", spread, Policy{Daily: 3}, "cde", "", map[string][]string{"b": {ReasonNotKept}}},
		{"weekly by ISO week", spread, Policy{Weekly: 2}, "de", "", map[string][]string{"d": {"weekly 2026-W50"}, "e": {ReasonNewest, "weekly 2026-W53"}}},
		{"weekly 3", spread, Policy{Weekly: 3}, "cde", "", map[string][]string{"c": {"weekly 2026-W49"}}},
		{"monthly", spread, Policy{Monthly: 2}, "de", "", map[string][]string{"d": {"monthly 2026-12"}}},
		{"yearly", spread, Policy{Yearly: 5}, "de", "", map[string][]string{"d": {"yearly 2026"}, "e": {ReasonNewest, "yearly 2027"}}},
		{"union of rules", spread, Policy{KeepLast: 1, Daily: 1, Monthly: 2}, "de", "", nil},
		{"max chain 2 on a straight chain", hourly, Policy{MaxChain: 2}, "abcdef", "d", map[string][]string{"d": {ReasonAll, "chain longer than 3 files"}}},
		{"max chain 1", hourly, Policy{MaxChain: 1}, "abcdef", "ce", nil},
		{"max chain 0 is unbounded", hourly, Policy{}, "abcdef", "", nil},
		{"dropped points do not count toward depth", hourly, Policy{KeepLast: 3, MaxChain: 2}, "def", "", nil},
		{"a dropped full still carries the chain", hourly, Policy{KeepLast: 4, MaxChain: 2}, "cdef", "f", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ds, err := Select(tc.points, tc.policy)
			require.NoError(t, err)
			require.Len(t, ds, len(tc.points))
			assert.Equal(t, tc.keep, kept(ds), "kept")
			assert.Equal(t, tc.flatten, flattened(ds), "flattened")
			for _, d := range ds {
				if want, ok := tc.reasonsOf[d.ID]; ok {
					assert.Equal(t, want, d.Reasons, "reasons of %s", d.ID)
				}
				assert.NotEmpty(t, d.Reasons, "every decision says why (%s)", d.ID)
			}
		})
	}
}

// A full point in the middle starts a new chain; so does a point whose parent is not given.
func TestSelectDepthFollowsParents(t *testing.T) {
	points := chain(0, time.Hour, 2*time.Hour, 3*time.Hour, 4*time.Hour)
	points[2].Parent = ""     // c is full
	points[4].Parent = "gone" // e's parent is not a complete point: counts as full
	ds, err := Select(points, Policy{MaxChain: 1})
	require.NoError(t, err)
	assert.Equal(t, "", flattened(ds))
	points[4].Parent = "d"
	ds, err = Select(points, Policy{MaxChain: 1})
	require.NoError(t, err)
	assert.Equal(t, "e", flattened(ds))
}

// The operator's deletions win over every rule, the newest point's too, and the chains are
// bounded over what then stays.
func TestSelectDeletes(t *testing.T) {
	points := chain(0, time.Hour, 2*time.Hour, 3*time.Hour, 4*time.Hour, 5*time.Hour)
	points[2].Delete = true
	ds, err := Select(points, Policy{MaxChain: 2})
	require.NoError(t, err)
	assert.Equal(t, "abdef", kept(ds))
	assert.Equal(t, []string{ReasonDeleted}, ds[2].Reasons)
	assert.Equal(t, "e", flattened(ds), "c's data moves into d: d reads 3 files, e would read 4")

	points[5].Delete = true
	ds, err = Select(points, Policy{KeepLast: 1})
	require.NoError(t, err)
	assert.Equal(t, "", kept(ds), "keep last 1 kept only the newest, and it is deleted")
	assert.Equal(t, []string{ReasonDeleted}, ds[5].Reasons)
}

func TestSelectRefusesBadInput(t *testing.T) {
	_, err := Select(chain(time.Hour, 0), Policy{})
	assert.ErrorContains(t, err, "not oldest first")
	twice := chain(0, time.Hour)
	twice[1].ID = twice[0].ID
	_, err = Select(twice, Policy{})
	assert.ErrorContains(t, err, "given twice")
	_, err = Select(chain(0), Policy{Daily: -1})
	assert.ErrorIs(t, err, ErrInvalid)
}

func TestPolicyValidate(t *testing.T) {
	require.NoError(t, Policy{}.Validate())
	require.NoError(t, Policy{KeepLast: MaxCount, Daily: 7, Weekly: 4, Monthly: 12, Yearly: 3, MaxChain: MaxChain}.Validate())
	for _, tc := range []struct {
		policy Policy
		want   string
	}{
		{Policy{KeepLast: -1}, "keep-last -1 is not 0-10000"},
		{Policy{Daily: -3}, "daily -3 is not 0-10000"},
		{Policy{Weekly: MaxCount + 1}, "weekly 10001 is not 0-10000"},
		{Policy{Monthly: -1}, "monthly -1"},
		{Policy{Yearly: 1 << 40}, "yearly 1099511627776"},
		{Policy{MaxChain: -1}, "max-chain -1 is not 0-1000"},
		{Policy{MaxChain: MaxChain + 1}, "max-chain 1001"},
	} {
		err := tc.policy.Validate()
		assert.ErrorIs(t, err, ErrInvalid)
		assert.ErrorContains(t, err, tc.want)
	}
	err := Policy{KeepLast: -1, MaxChain: -2}.Validate()
	assert.ErrorContains(t, err, "keep-last")
	assert.ErrorContains(t, err, "max-chain", "every bad field is named")
}

// randomPoints makes n points over about a year and a half, several a day at times, each
// an incremental on the previous one or (one in five) a full.
func randomPoints(r *rand.Rand, n int) []Point {
	points := make([]Point, n)
	at := base
	for i := range points {
		at = at.Add(time.Duration(r.Int64N(int64(3 * day))))
		points[i] = Point{ID: at.Format("20060102T150405.000000000Z") + string(rune('a'+i%26)), FinishedAt: at}
		if i > 0 && r.IntN(5) > 0 {
			points[i].Parent = points[i-1].ID
		}
	}
	return points
}

func randomPolicy(r *rand.Rand) Policy {
	n := func() int {
		if r.IntN(2) == 0 {
			return 0
		}
		return r.IntN(8)
	}
	return Policy{KeepLast: n(), Daily: n(), Weekly: n(), Monthly: n(), Yearly: n(), MaxChain: n()}
}

// afterMerges is the kept points as the repository holds them once the plan is carried
// out: each one's parent is its nearest kept ancestor, a flattened one is full.
func afterMerges(points []Point, ds []Decision) []Point {
	index := map[string]int{}
	for i, p := range points {
		index[p.ID] = i
	}
	var out []Point
	for i, p := range points {
		if !ds[i].Keep {
			continue
		}
		q := p
		q.Parent = ""
		if !ds[i].Flatten {
			for j, ok := index[p.Parent]; ok; j, ok = index[points[j].Parent] {
				if ds[j].Keep {
					q.Parent = points[j].ID
					break
				}
			}
		}
		out = append(out, q)
	}
	return out
}

func depths(points []Point) map[string]int {
	d := map[string]int{}
	for _, p := range points {
		d[p.ID] = 1
		if p.Parent != "" {
			d[p.ID] = d[p.Parent] + 1
		}
	}
	return d
}

func TestSelectProperties(t *testing.T) {
	r := rand.New(rand.NewPCG(13, 2026))
	for round := range 1000 {
		points := randomPoints(r, r.IntN(60))
		policy := randomPolicy(r)
		ds, err := Select(points, policy)
		require.NoError(t, err)
		if len(points) == 0 {
			continue
		}
		last := len(points) - 1
		require.True(t, ds[last].Keep, "round %d: the newest point is kept", round)

		// keep-last keeps exactly the newest N (more only through other rules).
		if policy.KeepLast > 0 && policy.Daily+policy.Weekly+policy.Monthly+policy.Yearly == 0 {
			want := min(policy.KeepLast, len(points))
			n := 0
			for _, d := range ds {
				if d.Keep {
					n++
				}
			}
			assert.Equal(t, want, n, "round %d: keep last %d of %d", round, policy.KeepLast, len(points))
			for i := range points {
				assert.Equal(t, i >= len(points)-want, ds[i].Keep, "round %d: point %d", round, i)
			}
		}

		// GFS: the kept periods are the newest N periods with points, each by its newest point.
		for _, g := range []struct {
			count  int
			prefix string
			period func(time.Time) string
		}{
			{policy.Daily, "daily ", func(t time.Time) string { return t.Format(dayLayout) }},
			{policy.Weekly, "weekly ", isoWeek},
			{policy.Monthly, "monthly ", func(t time.Time) string { return t.Format(monthLayout) }},
			{policy.Yearly, "yearly ", func(t time.Time) string { return t.Format(yearLayout) }},
		} {
			newest := map[string]int{} // period → its newest point
			var order []string
			for i, p := range points {
				period := g.period(p.FinishedAt)
				if _, ok := newest[period]; !ok {
					order = append(order, period)
				}
				newest[period] = i
			}
			slices.Reverse(order)
			for k, period := range order {
				for i := range points {
					has := slices.Contains(ds[i].Reasons, g.prefix+period)
					assert.Equal(t, k < g.count && i == newest[period], has, "round %d: %s%s (%d newest), point %d", round, g.prefix, period, k, i)
				}
			}
		}

		// Every kept point reads at most MaxChain+1 files after the merges.
		result := afterMerges(points, ds)
		if policy.MaxChain > 0 {
			for id, d := range depths(result) {
				assert.LessOrEqual(t, d, policy.MaxChain+1, "round %d: depth of %s", round, id)
			}
		}

		// Idempotence: the kept set, as the repository then holds it, is kept whole and
		// needs no more flattening.
		again, err := Select(result, policy)
		require.NoError(t, err)
		for _, d := range again {
			assert.True(t, d.Keep, "round %d: %s kept again", round, d.ID)
			assert.False(t, d.Flatten, "round %d: %s flattened again", round, d.ID)
		}
	}
}
