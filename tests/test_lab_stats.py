"""The lab's intervals: Wilson coverage on known binomials, bootstrap intervals of known ratios."""
import math

import numpy as np
import pytest

from minisparse.lab.stats import (accuracy, bootstrap_ratio, perplexity_ratio, wilson,
                                  wilson_coverage)


def test_wilson_matches_the_closed_form_and_brackets_the_estimate():
    # Wilson (1927): centre (p + z²/2n) / (1 + z²/n); 8/10 -> [0.4902, 0.9433] (Brown et al. 2001 table)
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.49016, abs=1e-5) and hi == pytest.approx(0.94332, abs=1e-5)
    for n in (1, 5, 37):
        for k in range(n + 1):
            lo, hi = wilson(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="k <= n"):
        wilson(5, 4)


@pytest.mark.parametrize("n,p", [(40, 0.5), (100, 0.2), (60, 0.9)])
def test_wilson_coverage_on_simulated_binomials_is_near_95_percent(n, p):
    m = 4000
    k = np.random.default_rng(1234 + n).binomial(n, p, size=m)                  # (m,)
    covered = np.mean([wilson(int(x), n)[0] <= p <= wilson(int(x), n)[1] for x in k])
    exact = wilson_coverage(n, p)
    # The simulation agrees with the exact coverage: the empirical rate of m Bernoulli(exact)
    # draws has sd sqrt(c(1-c)/m) <= 0.0038 at c ~ 0.95, m = 4000; 4 sd gives a false-failure
    # chance ~6e-5.
    assert abs(covered - exact) <= 4 * math.sqrt(exact * (1 - exact) / m)
    # Wilson's exact coverage oscillates around the nominal level with n and p (Brown, Cai &
    # DasGupta 2001); at these three cells it is 0.9615, 0.9405 and 0.9520 (wilson_coverage, an
    # exact binomial sum), so the simulated coverage is within 0.012 + 4 sd of 95%.
    assert abs(exact - 0.95) <= 0.012
    assert abs(covered - 0.95) <= 0.012 + 4 * math.sqrt(0.95 * 0.05 / m)


def test_wilson_coverage_fails_for_a_too_narrow_interval():
    # the check is not vacuous: z = 1 (a 68% interval) covers far less than 95%
    assert wilson_coverage(40, 0.5, z=1.0) < 0.8


def test_accuracy_keeps_the_count():
    a = accuracy([True] * 7 + [False] * 3)
    assert (a["n"], a["k"], a["acc"]) == (10, 7, 0.7)
    assert (a["lo"], a["hi"]) == wilson(7, 10)


def test_bootstrap_ratio_of_an_exact_ratio_is_a_point():
    den = np.random.default_rng(0).random(50) + 0.5
    r = bootstrap_ratio(3.0 * den, den, n_boot=200, seed=1)
    assert r["ratio"] == pytest.approx(3.0) and r["lo"] == pytest.approx(3.0) and r["hi"] == pytest.approx(3.0)


def test_bootstrap_ratio_covers_a_known_ratio_and_reproduces_with_its_seed():
    # population: den ~ U(1, 3) (mean 2), num = 1.5 den + N(0, 0.5): the ratio of means is 1.5
    reps, hits = 100, 0
    for r in range(reps):
        g = np.random.default_rng(r)
        den = g.uniform(1, 3, 200)
        num = 1.5 * den + g.normal(0, 0.5, 200)
        b = bootstrap_ratio(num, den, n_boot=500, seed=r)
        hits += b["lo"] <= 1.5 <= b["hi"]
    # The percentile bootstrap of a smooth statistic at n = 200 covers within a few points of 95%;
    # over 100 replications the hit rate has sd sqrt(.95 * .05 / 100) = 0.022, so 0.95 - 0.03
    # (bootstrap under-coverage allowance) - 3 sd = 0.85 bounds it below.
    assert hits / reps >= 0.85
    g = np.random.default_rng(7)
    num, den = g.random(30), g.random(30) + 1
    assert bootstrap_ratio(num, den, seed=5) == bootstrap_ratio(num, den, seed=5)
    assert bootstrap_ratio(num, den, seed=5)["lo"] != bootstrap_ratio(num, den, seed=6)["lo"]


def test_perplexity_ratio_of_a_constant_loss_shift():
    d = np.random.default_rng(3).exponential(2.0, 1000)
    r = perplexity_ratio(d + 0.1, d, n_boot=300, seed=0, block=32)
    # every token's loss is 0.1 nats higher, so the perplexity ratio is exactly e^0.1 in every resample
    assert r["ratio"] == pytest.approx(math.exp(0.1)) and r["lo"] == pytest.approx(math.exp(0.1))
    assert r["ppl_dense"] == pytest.approx(math.exp(d.mean()))
    with pytest.raises(ValueError, match="same non-zero length"):
        perplexity_ratio(d[:3], d)


def _ar1(g, n, phi, mu):
    """A stationary AR(1) series x_t = mu + phi (x_{t-1} - mu) + e_t, e_t ~ N(0, 1): neighbours
    correlated as neighbouring tokens' losses are."""
    x = np.empty(n)
    x[0] = g.normal(0, 1 / math.sqrt(1 - phi * phi))
    e = g.normal(0, 1, n)
    for t in range(1, n):
        x[t] = phi * x[t - 1] + e[t]
    return mu + x


def test_block_bootstrap_covers_a_known_perplexity_ratio_on_correlated_losses_and_iid_does_not():
    # per-token loss differences s - d: AR(1) with phi = 0.8 around mu = 0.1, so the true ratio
    # is e^0.1; the correlation length 1 / (1 - phi) = 5 tokens is far below the 64-token block
    reps, n, mu = 100, 1024, 0.1
    hits = {64: 0, 1: 0}
    for r in range(reps):
        g = np.random.default_rng(100 + r)
        d = g.exponential(2.0, n)
        s = d + _ar1(g, n, 0.8, mu)
        for block in hits:
            b = perplexity_ratio(s, d, n_boot=400, seed=r, block=block)
            hits[block] += b["lo"] <= math.exp(mu) <= b["hi"]
    # Blocks of 64 keep the correlation (Kunsch 1989): coverage within a few points of 95%; over
    # 100 replications the rate has sd sqrt(.95 * .05 / 100) = 0.022, so 0.95 - 0.03 (bootstrap
    # under-coverage allowance) - 3 sd = 0.85 bounds it below.
    assert hits[64] / reps >= 0.85
    # Single tokens ignore it: the variance of the mean is (1 + phi) / (1 - phi) = 9 times the
    # iid one, so the iid interval spans +-1.96 / 3 true sd and covers ~ P(|Z| < 0.65) = 0.48
    # (sd over 100 replications 0.05): below 0.75 by more than 5 sd. Blocks are what make it work.
    assert hits[1] / reps < 0.75


def test_bootstrap_diff_covers_a_known_paired_difference():
    from minisparse.lab.stats import bootstrap_diff
    # paired examples: b right with probability 0.5; a right whenever b is, and on 40% of the
    # rest, so P(a) = 0.5 + 0.5 * 0.4 = 0.7 and the true difference is 0.2
    reps, n, hits = 100, 120, 0
    for r in range(reps):
        g = np.random.default_rng(500 + r)
        b = g.random(n) < 0.5
        a = b | (g.random(n) < 0.4)
        res = bootstrap_diff(a, b, n_boot=500, seed=r)
        hits += res["lo"] <= 0.2 <= res["hi"]
    # as above: the percentile bootstrap of a mean at n = 120 covers within a few points of 95%;
    # 0.95 - 0.03 - 3 sd (0.022) = 0.85
    assert hits / reps >= 0.85
    same = bootstrap_diff([1.0, 0.0, 1.0], [1.0, 0.0, 1.0], n_boot=50)
    assert (same["diff"], same["lo"], same["hi"]) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same non-zero length"):
        bootstrap_diff([1.0], [1.0, 0.0])
