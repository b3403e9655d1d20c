//! Time as people say it in chat and write it in a schedule: durations (`1h30m`), times of day
//! (`until 18:00`, `until tomorrow 9:00`), weekly schedules (`Mon-Fri 08:00`) in an IANA time
//! zone, and the words replies use for an instant (`17:42`, `Mon 08:00`).
//!
//! Pure: every function takes the current instant (ms since the Unix epoch) from its caller's
//! injectable clock. Calendar arithmetic and daylight-saving rules are jiff's.

use std::{fmt, time::Duration};

use jiff::{
    Timestamp, Zoned,
    civil::{Date, Weekday},
    tz::TimeZone,
};

/// The longest a timed start may last, whatever the target's `max_on`.
pub const LONGEST_TIMED_START: Duration = Duration::from_secs(7 * 24 * 3600);

/// Reads a duration as chat and config write it: `30m`, `2h`, `1h30m`, `1d`; at least a minute.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let example = "write it like 30m, 2h or 1h30m";
    let mut rest = text.trim().to_ascii_lowercase();
    if rest.is_empty() {
        return Err(format!("a duration is missing; {example}"));
    }
    let mut total: u64 = 0;
    let mut last_unit = u64::MAX;
    while !rest.is_empty() {
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        let (number, tail) = rest.split_at(digits);
        let mut chars = tail.chars();
        let unit = match chars.next() {
            Some('d') => 86_400,
            Some('h') => 3_600,
            Some('m') => 60,
            _ => return Err(format!("{text:?} is not a duration; {example}")),
        };
        if number.is_empty() || unit >= last_unit {
            return Err(format!("{text:?} is not a duration; {example}"));
        }
        let n: u64 = number.parse().map_err(|_| format!("{text:?} is far too long"))?;
        total = n
            .checked_mul(unit)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(|| format!("{text:?} is far too long"))?;
        last_unit = unit;
        rest = chars.as_str().to_owned();
    }
    if total < 60 {
        return Err(format!("{text:?} is no time at all; give at least 1m"));
    }
    Ok(Duration::from_secs(total))
}

/// A duration written the way [`parse_duration`] reads it, in whole minutes: `1h30m`, `2h`.
pub fn duration_text(d: Duration) -> String {
    let minutes = d.as_secs() / 60;
    let (h, m) = (minutes / 60, minutes % 60);
    match (h, m) {
        (0, m) => format!("{m}m"),
        (h, 0) => format!("{h}h"),
        (h, m) => format!("{h}h{m}m"),
    }
}

/// A time of day, `HH:MM` on a 24-hour clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TimeOfDay {
    /// 0–23.
    pub hour: i8,
    /// 0–59.
    pub minute: i8,
}

impl TimeOfDay {
    /// Reads `18:00`, `9:00` or `09:05`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a time of day; use HH:MM on a 24-hour clock, e.g. 18:00");
        let (h, m) = text.trim().split_once(':').ok_or_else(bad)?;
        let digits = |s: &str, max: i8| -> Option<i8> {
            (!s.is_empty() && s.len() <= 2 && s.chars().all(|c| c.is_ascii_digit()))
                .then(|| s.parse::<i8>().ok())
                .flatten()
                .filter(|n| *n <= max)
        };
        match (digits(h, 23), digits(m, 59)) {
            (Some(hour), Some(minute)) if m.len() == 2 => Ok(TimeOfDay { hour, minute }),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for TimeOfDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02}:{:02}", self.hour, self.minute)
    }
}

/// The instant a time of day means at `now_ms` in `tz`: today's, or tomorrow's when today's has
/// passed or `tomorrow` is asked for. On a day when that time does not exist (clocks jump
/// forward over it), the first instant after the gap; when it comes twice, the first.
pub fn next_time_of_day(now_ms: i64, tz: &TimeZone, at: TimeOfDay, tomorrow: bool) -> i64 {
    let now = zoned(now_ms, tz);
    let today = now.date();
    let on = |date: Date| instant(date, at, tz);
    let first = if tomorrow { on(next_day(today)) } else { on(today) };
    if first > now_ms { first } else { on(next_day(today)) }
}

/// Which days of the week a schedule entry covers, Monday first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Days([bool; 7]);

impl Days {
    fn parse(text: &str) -> Result<Self, String> {
        let mut days = [false; 7];
        if text.eq_ignore_ascii_case("daily") {
            return Ok(Days([true; 7]));
        }
        for part in text.split(',') {
            let (from, to) = part.split_once('-').unwrap_or((part, part));
            let (from, to) = (weekday(from)?, weekday(to)?);
            let mut d = from;
            loop {
                days[d] = true;
                if d == to {
                    break;
                }
                d = (d + 1) % 7;
            }
        }
        Ok(Days(days))
    }

    fn has(&self, day: Weekday) -> bool {
        self.0[day.to_monday_zero_offset() as usize]
    }
}

const WEEKDAY_NAMES: [&str; 7] = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"];

/// Monday = 0, from `Mon` or `Monday` in any case.
fn weekday(text: &str) -> Result<usize, String> {
    let t = text.trim().to_ascii_lowercase();
    WEEKDAY_NAMES
        .iter()
        .position(|name| t == *name || t == name[..3])
        .ok_or_else(|| format!("{text:?} is not a day of the week; use Mon, Tue, … Sun"))
}

/// One schedule entry: days of the week and a time of day, `Mon-Fri 08:00`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moment {
    days: Days,
    at: TimeOfDay,
}

impl Moment {
    /// Reads `Mon-Fri 08:00`, `Sat,Sun 10:30`, `daily 07:00` or `Fri-Mon 22:00`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (days, at) = text
            .trim()
            .rsplit_once(' ')
            .ok_or_else(|| format!("{text:?} needs days and a time, e.g. \"Mon-Fri 08:00\""))?;
        Ok(Moment { days: Days::parse(days.trim())?, at: TimeOfDay::parse(at)? })
    }

    /// The first instant of this entry after `after_ms` in `tz`.
    fn next_after(&self, after_ms: i64, tz: &TimeZone) -> Option<i64> {
        let mut date = zoned(after_ms, tz).date();
        for _ in 0..=8 {
            if self.days.has(date.weekday()) {
                let at = instant(date, self.at, tz);
                if at > after_ms {
                    return Some(at);
                }
            }
            date = next_day(date);
        }
        None
    }
}

/// A transition of a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Switch {
    /// Scale up.
    On,
    /// Scale to zero.
    Off,
}

impl Switch {
    /// `on` or `off`, as stored and counted.
    pub fn as_str(self) -> &'static str {
        match self {
            Switch::On => "on",
            Switch::Off => "off",
        }
    }

    /// The other one.
    pub fn opposite(self) -> Switch {
        match self {
            Switch::On => Switch::Off,
            Switch::Off => Switch::On,
        }
    }
}

/// A weekly schedule: when a target is switched on and off, in a time zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    on: Vec<Moment>,
    off: Vec<Moment>,
    tz: TimeZone,
}

impl Schedule {
    /// A schedule from its `on` and `off` entries in `tz`; at least one of each.
    pub fn new(on: &[String], off: &[String], tz: TimeZone) -> Result<Self, String> {
        let read = |entries: &[String], what: &str| -> Result<Vec<Moment>, String> {
            if entries.is_empty() {
                return Err(format!("`{what}` is missing; give e.g. {what}: \"Mon-Fri 08:00\""));
            }
            entries.iter().map(|e| Moment::parse(e).map_err(|m| format!("{what}: {m}"))).collect()
        };
        Ok(Schedule { on: read(on, "on")?, off: read(off, "off")?, tz })
    }

    /// The schedule's time zone.
    pub fn tz(&self) -> &TimeZone {
        &self.tz
    }

    /// The first `switch` after `after_ms`.
    pub fn next(&self, switch: Switch, after_ms: i64) -> Option<i64> {
        let moments = match switch {
            Switch::On => &self.on,
            Switch::Off => &self.off,
        };
        moments.iter().filter_map(|m| m.next_after(after_ms, &self.tz)).min()
    }
}

/// How a reply names an instant for someone at `now_ms` in `tz`: `17:42` today, `Mon 08:00`
/// within the week, `2026-12-24 08:00` beyond it.
pub fn when_text(now_ms: i64, at_ms: i64, tz: &TimeZone) -> String {
    let (now, at) = (zoned(now_ms, tz), zoned(at_ms, tz));
    let days_ahead = (at.date() - now.date()).get_days();
    if at.date() == now.date() {
        at.strftime("%H:%M").to_string()
    } else if (1..7).contains(&days_ahead) {
        at.strftime("%a %H:%M").to_string()
    } else {
        at.strftime("%Y-%m-%d %H:%M").to_string()
    }
}

/// Reads an IANA time zone name (`Europe/Berlin`, `UTC`).
pub fn time_zone(name: &str) -> Result<TimeZone, String> {
    TimeZone::get(name.trim())
        .map_err(|_| format!("{name:?} is not an IANA time zone; use a name like Europe/Berlin or UTC"))
}

fn zoned(ms: i64, tz: &TimeZone) -> Zoned {
    Timestamp::from_millisecond(ms).unwrap_or(Timestamp::UNIX_EPOCH).to_zoned(tz.clone())
}

fn next_day(date: Date) -> Date {
    date.tomorrow().unwrap_or(date)
}

fn instant(date: Date, at: TimeOfDay, tz: &TimeZone) -> i64 {
    date.at(at.hour, at.minute, 0, 0).to_zoned(tz.clone()).map(|z| z.timestamp().as_millisecond()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn berlin() -> TimeZone {
        time_zone("Europe/Berlin").unwrap()
    }

    /// The instant of the wall-clock time `civil` ("2026-12-04 20:00") in `tz`.
    fn local(civil: &str, tz: &TimeZone) -> i64 {
        civil.parse::<jiff::civil::DateTime>().unwrap().to_zoned(tz.clone()).unwrap().timestamp().as_millisecond()
    }

    /// The instant `utc` ("2026-12-07T07:00:00Z").
    fn utc(utc: &str) -> i64 {
        utc.parse::<Timestamp>().unwrap().as_millisecond()
    }

    fn schedule(on: &str, off: &str, tz: TimeZone) -> Schedule {
        Schedule::new(&[on.to_owned()], &[off.to_owned()], tz).unwrap()
    }

    #[test]
    fn durations_read_minutes_hours_and_days_and_write_back_the_same() {
        for (text, secs) in [("30m", 1800), ("2h", 7200), ("1h30m", 5400), ("90m", 5400), ("1d", 86_400), ("2H", 7200)]
        {
            assert_eq!(parse_duration(text), Ok(Duration::from_secs(secs)), "{text}");
            let written = duration_text(Duration::from_secs(secs));
            assert_eq!(parse_duration(&written), Ok(Duration::from_secs(secs)), "{text} → {written}");
        }
        assert_eq!(duration_text(Duration::from_secs(5400)), "1h30m");
    }

    #[test]
    fn a_duration_that_is_no_time_garbled_or_absurdly_long_is_refused_with_an_example() {
        for text in ["0m", "0h", "", "2x", "h", "30m2h", "1.5h", "2 h", "99999999999999999999h", "9999999999999999d"] {
            let err = parse_duration(text).unwrap_err();
            assert!(err.contains("30m") || err.contains("1m") || err.contains("too long"), "{text}: {err}");
        }
    }

    #[test]
    fn a_time_of_day_is_hh_mm_on_a_24_hour_clock() {
        assert_eq!(TimeOfDay::parse("18:00"), Ok(TimeOfDay { hour: 18, minute: 0 }));
        assert_eq!(TimeOfDay::parse("9:05"), Ok(TimeOfDay { hour: 9, minute: 5 }));
        assert_eq!(TimeOfDay::parse("9:05").unwrap().to_string(), "09:05");
        for bad in ["25:00", "24:00", "18:60", "18:5", "1800", "18:00pm", ":30", "-1:00"] {
            let err = TimeOfDay::parse(bad).unwrap_err();
            assert!(err.contains("HH:MM"), "{bad}: {err}");
        }
    }

    #[test]
    fn until_means_today_unless_that_time_has_passed_or_tomorrow_is_said() {
        let tz = berlin();
        let now = local("2026-12-03 15:00", &tz);
        let at = |h, m| TimeOfDay { hour: h, minute: m };
        assert_eq!(next_time_of_day(now, &tz, at(18, 0), false), local("2026-12-03 18:00", &tz));
        assert_eq!(next_time_of_day(now, &tz, at(9, 0), false), local("2026-12-04 09:00", &tz));
        assert_eq!(next_time_of_day(now, &tz, at(18, 0), true), local("2026-12-04 18:00", &tz));
        assert_eq!(next_time_of_day(now, &tz, at(15, 0), false), local("2026-12-04 15:00", &tz), "now is past");
    }

    #[test]
    fn a_weekday_schedule_skips_the_weekend_in_its_own_time_zone() {
        let tz = berlin();
        let s = schedule("Mon-Fri 08:00", "Mon-Fri 19:00", tz.clone());
        let friday_evening = local("2026-12-04 20:00", &tz);
        assert_eq!(s.next(Switch::On, friday_evening), Some(utc("2026-12-07T07:00:00Z")));
        assert_eq!(s.next(Switch::Off, friday_evening), Some(utc("2026-12-07T18:00:00Z")));
        let monday_noon = local("2026-12-07 12:00", &tz);
        assert_eq!(s.next(Switch::Off, monday_noon), Some(local("2026-12-07 19:00", &tz)));
    }

    #[test]
    fn a_schedule_keeps_its_wall_clock_time_across_the_daylight_saving_changes() {
        let tz = berlin();
        let s = schedule("daily 08:00", "daily 19:00", tz.clone());
        // NB: 2026-03-29 clocks go from 02:00 CET to 03:00 CEST; 2026-10-25 from 03:00 CEST to 02:00 CET.
        assert_eq!(s.next(Switch::On, local("2026-03-28 09:00", &tz)), Some(utc("2026-03-29T06:00:00Z")));
        assert_eq!(s.next(Switch::On, local("2026-03-27 09:00", &tz)), Some(utc("2026-03-28T07:00:00Z")));
        assert_eq!(s.next(Switch::On, local("2026-10-24 09:00", &tz)), Some(utc("2026-10-25T07:00:00Z")));
    }

    #[test]
    fn a_time_skipped_by_the_clocks_runs_right_after_the_gap_and_a_repeated_one_runs_once() {
        let tz = berlin();
        let s = schedule("daily 02:30", "daily 04:00", tz.clone());
        assert_eq!(s.next(Switch::On, local("2026-03-28 12:00", &tz)), Some(utc("2026-03-29T01:30:00Z")));
        let first = s.next(Switch::On, local("2026-10-24 12:00", &tz)).unwrap();
        assert_eq!(first, utc("2026-10-25T00:30:00Z"), "the first 02:30, still in summer time");
        assert_eq!(s.next(Switch::On, first), Some(utc("2026-10-26T01:30:00Z")), "not the second 02:30");
    }

    #[test]
    fn schedule_days_take_ranges_lists_wrapping_ranges_and_daily() {
        let tz = TimeZone::UTC;
        let sunday = utc("2026-12-06T12:00:00Z");
        let next_on = |on: &str| schedule(on, "daily 23:59", tz.clone()).next(Switch::On, sunday).unwrap();
        assert_eq!(next_on("Fri-Mon 10:00"), utc("2026-12-07T10:00:00Z"));
        assert_eq!(next_on("Sat,Sun 13:00"), utc("2026-12-06T13:00:00Z"));
        assert_eq!(next_on("daily 11:00"), utc("2026-12-07T11:00:00Z"));
        assert_eq!(next_on("wednesday 09:00"), utc("2026-12-09T09:00:00Z"));
        let several = Schedule::new(&["Mon 09:00".into(), "Thu 14:00".into()], &["daily 23:00".into()], tz).unwrap();
        assert_eq!(several.next(Switch::On, utc("2026-12-07T10:00:00Z")), Some(utc("2026-12-10T14:00:00Z")));
    }

    #[test]
    fn a_bad_schedule_entry_names_what_is_wrong() {
        let err = Schedule::new(&["Funday 08:00".into()], &["daily 19:00".into()], TimeZone::UTC).unwrap_err();
        assert!(err.starts_with("on:") && err.contains("day of the week"), "{err}");
        let err = Schedule::new(&["Mon 08:00".into()], &["Mon 25:00".into()], TimeZone::UTC).unwrap_err();
        assert!(err.starts_with("off:") && err.contains("HH:MM"), "{err}");
        let err = Schedule::new(&["Mon 08:00".into()], &[], TimeZone::UTC).unwrap_err();
        assert!(err.contains("`off` is missing"), "{err}");
        let err = Schedule::new(&["08:00".into()], &["Mon 19:00".into()], TimeZone::UTC).unwrap_err();
        assert!(err.contains("needs days and a time"), "{err}");
    }

    #[test]
    fn replies_name_an_instant_by_its_time_today_its_weekday_this_week_and_its_date_beyond() {
        let tz = berlin();
        let now = local("2026-12-03 15:00", &tz);
        assert_eq!(when_text(now, local("2026-12-03 17:42", &tz), &tz), "17:42");
        assert_eq!(when_text(now, local("2026-12-07 08:00", &tz), &tz), "Mon 08:00");
        assert_eq!(when_text(now, local("2026-12-24 08:00", &tz), &tz), "2026-12-24 08:00");
    }

    #[test]
    fn an_unknown_time_zone_is_refused_with_an_example() {
        let err = time_zone("Mars/Olympus_Mons").unwrap_err();
        assert!(err.contains("IANA") && err.contains("Europe/Berlin"), "{err}");
        assert!(time_zone("UTC").is_ok());
    }
}
