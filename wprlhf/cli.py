"""The `wprlhf` command: one subcommand per job, each mapped onto one config dataclass.

Every field of a config is a flag (`--batch-size 8`, `--no-adaptive-kl`); a `--config FILE.yaml|json` sets
many at once, and flags given on the command line win over it. Only this module reads sys.argv.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sqlite3
import sys
import types
import typing
from pathlib import Path

from .allocator import keep_freed_memory
from .errors import UserError


def _optional_number(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "null", "off") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def field_docs(config_cls) -> dict[str, str]:
    """{field name: its docstring} of a config dataclass: the string literal written under each field, as the
    configs document every setting; a subclass's docstring of a field wins over its base class's."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(config_cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for statement, following in zip(body, body[1:]):
            if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):  # fmt: skip
                docs[statement.target.id] = " ".join(following.value.value.split())
    return docs


def first_sentence(text: str) -> str:
    """The text up to its first full stop that ends a sentence (one followed by a space and a capital or an
    opening bracket), as a flag's help shows it; `wprlhf X -h` is a summary, the docstring the whole story. A
    semicolon does not end it: "False: a separate network; True: a head" keeps both halves, nor does an
    abbreviation: "(e.g. 'best-of-8')" stays whole."""
    import re

    return re.split(r"(?<!e\.g\.)(?<!i\.e\.)(?<=\.)\s+(?=[A-Z('])", text, maxsplit=1)[0]


def add_config_flags(parser: argparse.ArgumentParser, config_cls, skip: tuple[str, ...] = (), prefix: str = "",
                     renamed: dict[str, str] | None = None) -> None:  # fmt: skip
    """One flag per dataclass field, its help the first sentence of the field's docstring; defaults are None so
    that only flags the user typed override a file. A section (a field that is itself a config dataclass, e.g.
    StoriesConfig.ppo) gets a group of its own, flags --SECTION-FIELD (dest 'section.field'); the flat flags of
    earlier versions (config_cls.RENAMED) stay as aliases."""
    hints, docs = typing.get_type_hints(config_cls), field_docs(config_cls)
    renamed = getattr(config_cls, "RENAMED", {}) if renamed is None else renamed
    aliases = {new: "--" + old.replace("_", "-") for old, new in renamed.items()}
    title = (f"{prefix[:-1]}: {first_sentence(' '.join((config_cls.__doc__ or '').split()))}" if prefix
             else f"{config_cls.__name__} settings (each also a key of a --config file)")  # fmt: skip
    group = parser.add_argument_group(title)
    for field in dataclasses.fields(config_cls):
        hint, path = hints[field.name], prefix + field.name
        if field.name in skip:
            continue
        if dataclasses.is_dataclass(hint):
            add_config_flags(parser, hint, prefix=path + ".", renamed=renamed)
            continue
        flag = "--" + path.replace(".", "-").replace("_", "-")
        names = [flag] + ([aliases[path]] if aliases.get(path, flag) != flag else [])
        default = repr(field.default) if isinstance(field.default, str) else field.default
        # argparse formats help with %: a literal percent sign in a docstring must be doubled
        about = first_sentence(docs.get(field.name, "")).replace("%", "%%")
        help_text = f"{about} (default {default})".strip() if about else f"(default {default})"
        if hint is bool:
            group.add_argument(*names, dest=path, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        args = typing.get_args(hint)
        optional = isinstance(hint, types.UnionType) and type(None) in args
        kind = next(a for a in args if a is not type(None)) if optional else hint
        if kind in (int, float):
            parse = _optional_number(kind) if optional else kind
        else:
            parse = str
        group.add_argument(*names, dest=path, type=parse, default=None, help=help_text, metavar=field.name.upper())


ALLOW_CHANGED_HELP = ("with --resume: continue even though an input (the prompts or data file, a reward file or "
                      "model, the policy) changed since the run started; its steps so far came from the old one")


def add_run_flags(parser: argparse.ArgumentParser, config_cls) -> None:
    """--out, --config, --resume, --allow-changed-inputs and --force of a pipeline made of phases, then one flag per
    config field."""
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument("--config", help=f"YAML or JSON file of {config_cls.__name__} fields (flags override it)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out where it stopped (its last finished phase or checkpoint)")
    parser.add_argument("--allow-changed-inputs", action="store_true", help=ALLOW_CHANGED_HELP)
    parser.add_argument("--force", action="store_true", help="delete a run already in --out and start over")
    add_config_flags(parser, config_cls)


def _overrides(args: argparse.Namespace, config_cls, prefix: str = "") -> dict:
    """The config fields given as flags, sections as mappings of their own ({'ppo': {'lr': 1e-5}})."""
    hints, out = typing.get_type_hints(config_cls), {}
    for field in dataclasses.fields(config_cls):
        path = prefix + field.name
        if dataclasses.is_dataclass(hints[field.name]):
            if given := _overrides(args, hints[field.name], path + "."):
                out[field.name] = given
        elif getattr(args, path, None) is not None:
            out[field.name] = getattr(args, path)
    return out


# ---------------------------------------------------------------------------------------------- subcommands


def _empty_out_dir(out: str, force: bool) -> None:
    """A training command writes into an empty --out; --force clears one that is not."""
    if Path(out).exists() and any(Path(out).iterdir()):
        if not force:
            raise UserError(f"{out} is not empty; choose another --out or pass --force to overwrite it")
        shutil.rmtree(out)


CONFIGS = {"ppo": "PPOConfig", "rloo": "RLOOConfig", "grpo": "GRPOConfig"}  # method module -> its config class


def _method(name: str):
    """(config class, train function) of an on-policy method: 'ppo', 'rloo' or 'grpo'."""
    import importlib

    module = importlib.import_module(f".methods.{name}", __package__)
    return getattr(module, CONFIGS[name]), module.train


def cmd_ppo(args: argparse.Namespace) -> None:
    """`wprlhf ppo`, `wprlhf rloo` and `wprlhf grpo`: one command shape, the method's own config and train()."""
    from .data import load_prompts
    from .distributed import is_main_process
    from .methods.onpolicy_config import dump_config, load_config
    from .report import write_report
    from .rewards.spec import load_reward

    config_cls, train = _method(args.method)
    config = load_config(args.config, _overrides(args, config_cls), getattr(args, "preset", None), config_cls)
    judge_fn = None
    if config.task:
        from .pipelines.sentiment import load_task

        if getattr(args, "reward", None) is not None:
            raise UserError(f"--task {config.task} brings its own reward (the classifier's log-odds); drop --reward")
        task = load_task(config.task, config.classifier, config.prompts)
        # A review is continued, not answered: no chat template unless asked for on the command line.
        chat_template = task.chat_template if getattr(args, "chat_template", None) is None else args.chat_template
        config = dataclasses.replace(config, reward=f"task:{config.task}", chat_template=chat_template)
        reward_fn, prompts, judge_fn = task.reward_fn, task.prompts, task.judge_fn
    elif config.classifier:
        raise UserError("--classifier is the reward of a --task (positive-reviews or sentiment-control); add --task, "
                        "or use --reward for other rewards")  # fmt: skip
    else:
        reward_fn = load_reward(config.reward)
        prompts = load_prompts(config.prompts)
    main = is_main_process()  # under `accelerate launch`, only one process prints and writes the report
    if main:
        print(dump_config(config), file=sys.stderr)
    if args.force and not args.resume and Path(args.out).exists():
        shutil.rmtree(args.out, ignore_errors=True)
    train(config, prompts, reward_fn, args.out, resume=args.resume, judge_fn=judge_fn,
          allow_changed_inputs=args.allow_changed_inputs)  # fmt: skip
    if main:
        report = write_report(args.out)
        print(f"done: {args.out}/metrics.csv, policy in {args.out}/policy, report {report}", file=sys.stderr)


def cmd_sample(args: argparse.Namespace) -> None:
    from .data import load_prompts
    from .distributed import resolve_device
    from .generation import GenerationConfig, check_bare_prompts, generate_k, write_samples
    from .models import load_policy

    if args.k is None:
        args.k = 1 if args.greedy else 2
    if args.k < 1:
        raise UserError(f"-k must be >= 1, got {args.k}")
    prompts = load_prompts(args.prompts)
    if args.max_prompts:
        prompts = prompts[: args.max_prompts]
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.greedy and (args.k > 1 or args.best_of is not None):
        raise UserError("--greedy writes the one most likely response to each prompt: with -k or --best-of above 1 "
                        "every response would be a copy of it; drop --greedy to sample several")  # fmt: skip
    policy, tokenizer = load_policy(args.policy, seed=args.seed)
    check_bare_prompts(tokenizer, prompts, not args.no_chat_template)  # every prompt, before any sampling
    policy.to(resolve_device(args.device))
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=args.greedy)  # fmt: skip
    if args.best_of is not None:
        from .methods.best_of import sample_pool, write_ranked

        if args.best_of < 1:
            raise UserError(f"--best-of must be >= 1 (samples per prompt to choose among), got {args.best_of}")
        from .rewards.spec import load_reward

        if not args.reward:
            raise UserError("--best-of N needs --reward SPEC to choose with (e.g. rm:runs/stories/rm)")
        pool = sample_pool(policy, tokenizer, prompts, args.best_of, load_reward(args.reward), config,
                           seed=args.seed, batch_size=args.batch_size, max_prompt_length=args.max_prompt_length,
                           chat_template=not args.no_chat_template)  # fmt: skip
        write_ranked(args.out, pool, args.policy, args.reward)
        print(f"wrote {len(prompts)} prompts x {args.best_of} responses, best first (best-of-{args.best_of} by "
              f"{args.reward}), to {args.out}", file=sys.stderr)  # fmt: skip
        return
    if args.reward:
        raise UserError("--reward chooses among samples only with --best-of N")
    finished: list[bool] = []
    responses = generate_k(policy, tokenizer, prompts, args.k, config, batch_size=args.batch_size, seed=args.seed,
                           max_prompt_length=args.max_prompt_length, chat_template=not args.no_chat_template,
                           progress=True, finished=finished)  # fmt: skip
    write_samples(args.out, prompts, responses, args.policy,
                  None if config.fixed_length else [finished[i * args.k : (i + 1) * args.k] for i in range(len(prompts))])
    cut = "" if config.fixed_length else f"; {sum(not f for f in finished)} of {len(finished)} cut at --max-new-tokens"
    print(f"wrote {len(prompts)} prompts x {args.k} responses to {args.out}{cut}", file=sys.stderr)


def cmd_task_eval(args: argparse.Namespace) -> None:
    from .files import write_json_atomic
    from .pipelines.sentiment import evaluate_task, summary

    policy = Path(args.policy)
    run: dict = {}  # the config.json of the run around policy/: its task, start policy, classifier and prompts
    if policy.is_dir() and (policy.parent / "config.json").is_file():
        try:
            found = json.loads((policy.parent / "config.json").read_text())
        except ValueError:
            found = None
        if isinstance(found, dict) and "task" in found and "policy" in found:  # written by `wprlhf ppo`
            run = found
    if args.out:
        out = Path(args.out)
    elif policy.is_dir() and (run or policy.name == "policy"):
        out = policy.parent / "task-eval.json"
    elif not policy.exists() and args.policy not in ("tiny", "smollm2"):
        raise UserError(f"--policy {args.policy} does not exist; point it at a run's policy folder (RUN/policy, "
                        "written by `wprlhf ppo --out RUN`)")  # fmt: skip
    else:
        raise UserError(f"--policy {args.policy} is not a run's policy folder, so there is no default output; "
                        "give --out FILE.json")  # fmt: skip
    task = args.task or run.get("task")
    if not task:
        raise UserError("task-eval needs --task positive-reviews or sentiment-control (or a run's policy folder, "
                        "whose config.json names its task)")  # fmt: skip
    chat_template = run.get("chat_template", False) if args.chat_template is None else args.chat_template
    # A run that trained on a directory's training reviews is judged on the same directory's test reviews; other
    # runs default to the shipped openings.
    prompts = args.prompts
    if prompts is None:
        prompts = run["prompts"] if run.get("prompts") and Path(run["prompts"]).is_dir() else ""
    result = evaluate_task(task, args.policy, args.start or run.get("policy") or "smollm2",
                           args.classifier or run.get("classifier", ""), prompts, args.n, args.response_length,
                           args.min_response_length, args.temperature, args.seed, args.batch_size, chat_template,
                           args.device, progress=True, greedy=args.greedy)  # fmt: skip
    write_json_atomic(out, result)
    print(summary(result))
    print(f"wrote {out}", file=sys.stderr)


def cmd_rm_train(args: argparse.Namespace) -> None:
    from .checkpoint import load_config
    from .distributed import is_main_process
    from .rewards.reward_model import RewardConfig, train

    config = load_config(RewardConfig, args.config, _overrides(args, RewardConfig))
    main = is_main_process()  # under `accelerate launch`, only one process prints
    if main:
        print(json.dumps(dataclasses.asdict(config), indent=2), file=sys.stderr)
    _empty_out_dir(args.out, args.force)
    result = train(config, args.out)
    if main:
        accuracy = f"{result['accuracy']:.3f}" if "accuracy" in result else "n/a (no held-out comparison with a winner)"
        print(f"held-out accuracy {accuracy}; model in {args.out}", file=sys.stderr)


def cmd_rm_eval(args: argparse.Namespace) -> None:
    from .rewards.reward_model import run_eval

    result = run_eval(args.model, args.data, args.out, args.max_examples, args.max_length, args.best_of,
                      args.keep_meta, args.train_data)  # fmt: skip
    print(json.dumps(result, indent=2, allow_nan=False))  # strict JSON, as the file run_eval wrote


def cmd_rm_table(args: argparse.Namespace) -> None:
    from .evals.rm_table import build

    table = build(args.model, args.data, args.out)
    print(Path(args.out, "rm_table.md").read_text())
    print(f"wrote rm_table.json, rm_table.md and rm_table.csv ({len(table['rows'])} rows) to {args.out}", file=sys.stderr)


def cmd_classifier_train(args: argparse.Namespace) -> None:
    from .checkpoint import load_config
    from .rewards.classifier import ClassifierConfig, train
    from .rewards.judges import sentiment

    config = load_config(ClassifierConfig, args.config, _overrides(args, ClassifierConfig))
    print(json.dumps(dataclasses.asdict(config), indent=2), file=sys.stderr)
    _empty_out_dir(args.out, args.force)
    result = train(config, args.out, polarity=sentiment)
    accuracy = f"{result['accuracy']:.3f}" if "accuracy" in result else "n/a (no held-out texts: --val-fraction 0)"
    print(f"held-out accuracy {accuracy} (baselines {result.get('baselines', {})}); model in {args.out}",
          file=sys.stderr)  # fmt: skip


def cmd_classifier_eval(args: argparse.Namespace) -> None:
    from .rewards.classifier import run_eval
    from .rewards.judges import sentiment

    if args.max_examples < 0:
        raise UserError(f"--max-examples must be >= 0 (0 = all), got {args.max_examples}")
    result = run_eval(args.model, args.data, args.out, args.max_examples, args.max_length, args.train_data,
                      polarity=sentiment, batch_size=args.batch_size)  # fmt: skip
    print(json.dumps(result, indent=2, allow_nan=False))  # strict JSON, as the file run_eval wrote


def cmd_compare(args: argparse.Namespace) -> None:
    from .checkpoint import load_config
    from .pipelines.compare import CompareConfig, run

    config = load_config(CompareConfig, args.config, _overrides(args, CompareConfig))
    print(json.dumps(dataclasses.asdict(config), indent=2), file=sys.stderr)
    if args.force and not args.resume and Path(args.out).exists():
        shutil.rmtree(args.out)
    run(config, args.out, resume=args.resume, allow_changed_inputs=args.allow_changed_inputs)
    print(f"done: {args.out}/table.md (judge {config.judge}, 95 % CIs), {args.out}/over_optimisation.png",
          file=sys.stderr)


def cmd_dpo(args: argparse.Namespace) -> None:
    from .checkpoint import load_config
    from .distributed import is_main_process
    from .methods.dpo import DPOConfig, train

    config = load_config(DPOConfig, args.config, _overrides(args, DPOConfig))
    if is_main_process():
        print(json.dumps(dataclasses.asdict(config), indent=2), file=sys.stderr)
    if args.force and not args.resume and Path(args.out).exists():
        shutil.rmtree(args.out, ignore_errors=True)
    row = train(config, args.out, resume=args.resume, allow_changed_inputs=args.allow_changed_inputs)
    if is_main_process():
        held_out = f", held-out accuracy {row['val_accuracy']:.1%}" if "val_accuracy" in row else ""
        print(f"done: {args.out}/metrics.csv{held_out}; policy in {args.out}/policy", file=sys.stderr)


def cmd_sft(args: argparse.Namespace) -> None:
    from .distributed import is_main_process
    from .methods.sft import SFTConfig, load_config, train

    config = load_config(args.config, _overrides(args, SFTConfig))
    main = is_main_process()  # under `accelerate launch`, only one process prints
    if main:
        print(json.dumps(dataclasses.asdict(config), indent=2), file=sys.stderr)
    if args.force and Path(args.out).exists():
        shutil.rmtree(args.out, ignore_errors=True)
    stories = None
    if config.task:  # the task knows its examples' format; SFT trains on what it is given
        from .pipelines.sentiment import sft_stories

        stories = sft_stories(config.task, config.data)
    result = train(config, args.out, stories=stories)
    if main:
        print(f"held-out loss {result['val_loss_before']:.4f} -> {result['val_loss_after']:.4f} nats per response "
              f"token on {result['n_val_examples']} stories; policy in {args.out}/policy", file=sys.stderr)  # fmt: skip


def _labeling(command):
    """Run a `label` action; labeling/ raises its own error type (it imports nothing from wprlhf): show it as ours."""

    def run(args: argparse.Namespace) -> None:
        from .labeling.store import LabelingError

        if command not in (cmd_label_serve, cmd_label_add, cmd_label_invite) and not Path(args.db).is_file():
            raise UserError(f"--db {args.db} does not exist; queue comparisons with `wprlhf label add --db FILE ...`")
        try:
            command(args)
        except LabelingError as err:
            raise UserError(str(err)) from None
        except sqlite3.Error as err:  # e.g. a disk that filled up, or a file made read-only while in use
            raise UserError(f"--db {args.db}: SQLite could not use it ({err}); check the file and its folder") from None
        except OSError as err:  # an output file that cannot be written
            raise UserError(f"could not write {err.filename or 'the output'}: {err.strerror or err}; name a file in "
                            "a folder you can write") from None  # fmt: skip

    return run


def cmd_label_serve(args: argparse.Namespace) -> None:
    from .labeling.app import serve

    if not 0 <= args.port <= 65535:  # uvicorn would fail with a traceback deep in the socket call
        raise UserError(f"--port {args.port} is not a TCP port; choose one in 1-65535 (0: any free one)")

    serve(args.db, args.host, args.port, args.token, args.labels_per_comparison, instructions=args.instructions,
          extra_hosts=args.allowed_host, token_file=args.token_file)  # fmt: skip


def cmd_label_invite(args: argparse.Namespace) -> None:
    from .labeling.store import Store

    secret = Store(args.db).invite(args.name, "lead" if args.lead else "labeler")
    base = args.url.rstrip("/")
    print(f"{base}/lead?token={secret}" if args.lead else f"{base}/?token={secret}")  # stdout: a script can take it
    print(f"that is {args.name!r}'s {'lead view' if args.lead else 'labeling link'} (inviting again replaces it); "
          f"send it privately. Revoke it with `wprlhf label revoke --db {args.db} {args.name!r}`", file=sys.stderr)


def cmd_label_revoke(args: argparse.Namespace) -> None:
    from .labeling.store import Store

    if not Store(args.db).revoke(args.name):
        raise UserError(f"{args.name!r} has no live invite in {args.db}; `wprlhf label status --db {args.db}` lists them")
    print(f"revoked {args.name!r}'s link: its pages stop at their next request; their labels stay", file=sys.stderr)


def cmd_label_add(args: argparse.Namespace) -> None:
    from .labeling.store import Store, read_samples

    samples = [s for path in args.samples for s in read_samples(path)]  # every file checked before any is queued
    added, present = Store(args.db).add(samples)
    print(f"queued {added} comparisons in {args.db}" + (f" ({present} were already queued)" if present else ""),
          file=sys.stderr)  # fmt: skip


def _check_label_output(path: str, db: str, flag: str) -> None:
    """UserError for an output path that would destroy the labels or cannot be a file: the database itself (or
    its -wal/-shm), a folder, a device."""
    out = Path(path)
    if not path or out.is_dir():
        raise UserError(f"{flag} {path!r} is not a file name; name a file such as labels.jsonl")
    if out.exists() and not out.is_file():
        raise UserError(f"{flag} {path} is not a regular file (a device or a pipe); name a file")
    if out.resolve() in {Path(db + suffix).resolve() for suffix in ("", "-wal", "-shm")}:
        raise UserError(f"{flag} {path} is the labels database itself (--db); writing there would destroy the "
                        "labels. Name another file")  # fmt: skip


def cmd_label_export(args: argparse.Namespace) -> None:
    from .labeling.store import Store

    _check_label_output(args.out, args.db, "--out")
    n = Store(args.db).export(args.out)
    print(f"wrote {n} labelled comparisons to {args.out} (skips left out)", file=sys.stderr)


def cmd_label_status(args: argparse.Namespace) -> None:
    from .labeling.store import Store

    if args.html:
        _check_label_output(args.html, args.db, "--html")
    store = Store(args.db)
    report, invites = store.lead_report(), store.invites()
    stats, kappa = report["stats"], report["agreement"]
    if args.html:
        from .files import write_text_atomic
        from .labeling.app import lead_html

        write_text_atomic(args.html, lead_html(report))
        print(f"wrote the lead's view to {args.html} (read-only; adjudicate on the server's /lead)", file=sys.stderr)
    if args.json:
        print(json.dumps({**stats, "kappa": kappa, "invites": invites}, indent=2))
        return
    agreement = "n/a (no comparison has 2 labels yet)" if stats["agreement"] is None else \
        f"{stats['agreement']:.3f} over {stats['agreement_pairs']} pairs of labels"  # fmt: skip
    print(f"comparisons {stats['comparisons']}: done {stats['done']}, queued {stats['queued']} "
          f"({stats['labels_per_comparison']} label(s) each)\nlabels {stats['labels']}, skips {stats['skips']}\n"
          f"agreement {agreement}")  # fmt: skip
    def number(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    if kappa["overall"]["items"]:
        print(f"Fleiss' kappa {number(kappa['overall']['kappa'])} over {kappa['overall']['items']} comparisons")
    for pair in kappa["pairs"]:
        print(f"  {pair['a']} & {pair['b']}: raw {number(pair['raw'])} ({pair['agree']} of {pair['items']}), "
              f"Cohen's kappa {number(pair['kappa'])}")  # fmt: skip
    if invites:
        print("invites: " + ", ".join(f"{i['name']} ({i['role']}{', revoked' if i['revoked_at'] else ''})"
                                      for i in invites))  # fmt: skip


def cmd_loop(args: argparse.Namespace) -> None:
    from .checkpoint import load_config
    from .pipelines.loop import LoopConfig, run
    from .report import write_report

    config = load_config(LoopConfig, args.config, _overrides(args, LoopConfig))
    print(json.dumps(dataclasses.asdict(config), indent=2), file=sys.stderr)
    if args.force and not args.resume and Path(args.out).exists():
        shutil.rmtree(args.out)
    rows = run(config, args.out, resume=args.resume, allow_changed_inputs=args.allow_changed_inputs)
    last = rows[-1]
    report = write_report(args.out)
    print(f"done: {args.out}/loop_metrics.csv and {report}; after round {last['round']} the judge prefers the policy to its start "
          f"{last['win_rate']:.1%} of the time (95% CI {last['win_rate_lo']:.1%}-{last['win_rate_hi']:.1%})",
          file=sys.stderr)  # fmt: skip


def cmd_stories(args: argparse.Namespace) -> None:
    from .checkpoint import load_config
    from .pipelines.stories import QUICK, StoriesConfig, run

    config = load_config(StoriesConfig, args.config, _overrides(args, StoriesConfig), QUICK if args.quick else None)
    print(json.dumps(dataclasses.asdict(config), indent=2), file=sys.stderr)
    if args.force and not args.resume and Path(args.out).exists():
        shutil.rmtree(args.out)
    report = run(config, args.out, resume=args.resume, until=args.until or "",
                 allow_changed_inputs=args.allow_changed_inputs)  # fmt: skip
    if report:
        print(f"done: {args.out}/eval/table.md (every judge, 95 % CIs), {args.out}/eval/samples.md; blind pairs "
              f"for people: wprlhf label serve --db {args.out}/eval/blind.db", file=sys.stderr)  # fmt: skip


def cmd_eval(args: argparse.Namespace) -> None:
    from .checkpoint import load_config
    from .evals.side_by_side import EvalConfig, blind_results, run_eval, win_text
    from .files import write_json_atomic

    if args.blind_results:
        result = blind_results(args.blind_results)
        if args.out:
            write_json_atomic(args.out, result)
        for pair, entry in result["pairs"].items():
            print(f"{pair}: {entry['labels']} labels (a tie counts 1/2 to each side)")
            for name, side in entry.items():
                if name != "labels":
                    print(f"  {name} wins {win_text(side)}")
        agreement = result["agreement"]
        said = "n/a (no comparison has two labels)" if agreement is None else f"{agreement:.1%}"
        print(f"agreement between labelers: {said} over {result['agreement_pairs']} pairs of labels")
        return
    config = load_config(EvalConfig, args.config, _overrides(args, EvalConfig))
    out = args.out or "eval.json"
    report = run_eval(config, out, blind_db=args.blind_db)
    for key, win in report["win_rates"].items():
        print(f"judge win rate {key}: {win_text(win)}")
    print(f"wrote {out} and {Path(out).with_suffix('.md')}", file=sys.stderr)
    if args.blind_db:
        print(f"queued {report['blind_queued']} blind pairs in {args.blind_db}: serve them with `wprlhf label serve "
              f"--db {args.blind_db}`, then `wprlhf eval --blind-results {args.blind_db}`", file=sys.stderr)  # fmt: skip


def cmd_report(args: argparse.Namespace) -> None:
    from .report import write_report

    out = write_report(args.run_dir, args.out)
    print(f"wrote {out} (plots beside it as {out.stem}-*.png)", file=sys.stderr)


def cmd_demo(args: argparse.Namespace) -> None:
    from .checkpoint import load_config
    from .pipelines.loop import DEMO, DEMO_QUICK, LoopConfig, run
    from .report import write_report

    flags = {"prompts": args.data, "policy": args.policy, "labeler": args.labeler, "reward_model": args.reward_model,
             "seed": args.seed}  # fmt: skip
    config = load_config(LoopConfig, args.config, {k: v for k, v in flags.items() if v is not None},
                         DEMO_QUICK if args.quick else DEMO)  # fmt: skip
    print(json.dumps(dataclasses.asdict(config), indent=2), file=sys.stderr)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.resume:
        if not args.force:
            raise UserError(f"{out} holds a run; pass --resume to continue it or --force to start over")
        shutil.rmtree(out)
    rows = run(config, out, resume=args.resume, allow_changed_inputs=args.allow_changed_inputs)
    report = write_report(out)
    last = rows[-1]
    print(f"done in {last['elapsed_s'] / 60:.1f} min: the judge prefers the trained policy to the start policy "
          f"{last['win_rate']:.1%} of the time (95% CI {last['win_rate_lo']:.1%}-{last['win_rate_hi']:.1%}), "
          f"KL {last['eval_kl']:.1f} nats; report: {report}", file=sys.stderr)  # fmt: skip


# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from .evals.side_by_side import EvalConfig
    from .methods.onpolicy_config import PRESETS, PPOConfig
    from .methods.sft import SFTConfig
    from .pipelines.loop import LoopConfig
    from .pipelines.stories import PHASES, StoriesConfig
    from .rewards.classifier import ClassifierConfig
    from .rewards.reward_model import RewardConfig

    parser = argparse.ArgumentParser(prog="wprlhf", description=(
        "RLHF for r/WritingPrompts on a laptop CPU: SFT, reward models from comparisons, PPO, RLOO, GRPO and DPO, "
        "best-of-n, the whole writing-prompts pipeline (stories), judged evaluation, a labeling page for people, "
        "and the sentiment demos."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    ppo = sub.add_parser("ppo", help="train a policy with PPO against a reward", description=(
        "PPO with a per-token KL penalty to the frozen initial policy. Writes metrics.csv, tb/, samples.jsonl, "
        "checkpoints/ and policy/ into --out."))  # fmt: skip
    ppo.add_argument("--out", required=True, help="run directory")
    ppo.add_argument("--config", help="YAML or JSON file of PPOConfig fields (flags override it)")
    ppo.add_argument("--preset", choices=sorted(PRESETS), help="start from a named set of settings")
    ppo.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    ppo.add_argument("--allow-changed-inputs", action="store_true", help=ALLOW_CHANGED_HELP)
    ppo.add_argument("--force", action="store_true", help="delete a run already in --out and start over")
    add_config_flags(ppo, PPOConfig)
    ppo.set_defaults(func=cmd_ppo, method="ppo")

    from .methods.grpo import GRPOConfig
    from .methods.rloo import RLOOConfig

    for name, config_cls, what in (
        ("rloo", RLOOConfig, "REINFORCE with a leave-one-out baseline over k samples a prompt (Ahmadian et al. 2024)"),
        ("grpo", GRPOConfig, "group-standardised advantages, k3 KL in the loss (Shao et al. 2024)"),
    ):  # fmt: skip
        method = sub.add_parser(name, help=f"train a policy with {name.upper()} against a reward", description=(
            f"{name.upper()}: {what}; no value model. The same reward SPECs, prompts and run directory as `wprlhf "
            "ppo` (metrics.csv, tb/, samples.jsonl, checkpoints/, policy/)."))  # fmt: skip
        add_run_flags(method, config_cls)
        method.set_defaults(func=cmd_ppo, method=name)

    from .generation import GenerationConfig

    gen_help = {name: f"{first_sentence(doc)} (default {getattr(GenerationConfig, name)})".replace("%", "%%")
                for name, doc in field_docs(GenerationConfig).items()}  # fmt: skip
    smp = sub.add_parser("sample", help="sample k responses per prompt into JSONL (the labeling input)")
    smp.add_argument("--policy", default="smollm2", help="'smollm2', 'tiny', a local directory or a hub id")
    smp.add_argument("--prompts", default="", help="prompt file (.txt/.jsonl/.csv/.csv.gz); empty = built-in")
    smp.add_argument("-k", type=int, default=None, help="responses per prompt (default 2; 1 with --greedy)")
    smp.add_argument("--best-of", type=int, default=None, metavar="N", help="sample N per prompt and write them "
                     "sorted by --reward, best first: the first response is best-of-N (replaces -k)")
    smp.add_argument("--reward", default="", help="the reward SPEC that ranks --best-of samples (rm:DIR, ...)")
    smp.add_argument("--out", required=True, help="output JSONL: {\"prompt\": str, \"responses\": [str, ...]}")
    smp.add_argument("--max-prompts", type=int, default=0, help="use only the first N prompts (0 = all)")
    smp.add_argument("--max-new-tokens", type=int, default=64, help=gen_help["max_new_tokens"])
    smp.add_argument("--min-new-tokens", type=int, default=0, help=gen_help["min_new_tokens"])
    smp.add_argument("--temperature", type=float, default=0.7, help=gen_help["temperature"])
    smp.add_argument("--greedy", action="store_true", help="the most likely token at every step instead of sampling")
    smp.add_argument("--top-k", type=int, default=0, help=gen_help["top_k"])
    smp.add_argument("--top-p", type=float, default=1.0, help=gen_help["top_p"])
    smp.add_argument("--max-prompt-length", type=int, default=128,
                     help="prompts longer than this keep their last tokens (default 128)")
    smp.add_argument("--no-chat-template", action="store_true", help="feed prompts as plain text")
    smp.add_argument("--batch-size", type=int, default=16, help="responses sampled at once (default 16)")
    smp.add_argument("--seed", type=int, default=0, help="seeds the sampling (and the tiny init) (default 0)")
    smp.add_argument("--device", default="auto", help="'auto' (a GPU where there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N' (default auto)")
    smp.set_defaults(func=cmd_sample)
    tev = sub.add_parser("task-eval", help="a `ppo --task` policy against its start policy on held-out openings",
                         description="Both policies continue the same held-out review openings; the task's classifier "
                         "and VADER (the judge) score them. Writes JSON: the means of reward (log-odds), P(positive) "
                         "and VADER for start and trained with paired 95% CIs of the difference (bootstrap over "
                         "openings), KL to the start policy, per-control means and the positive - negative gap for "
                         "sentiment-control, and a few sample pairs. Task, classifier and start default to those in "
                         "the run's config.json beside --policy.")  # fmt: skip
    tev.add_argument("--policy", required=True, help="the trained policy: a run's policy folder (RUN/policy)")
    tev.add_argument("--task", help="positive-reviews or sentiment-control (default: the run's)")
    tev.add_argument("--start", help="the policy PPO started from (default: the run's, else smollm2)")
    tev.add_argument("--classifier", help="the task's sentiment classifier directory (default: the run's)")
    tev.add_argument("--prompts", help="openings: a directory with imdb_test.csv (its test reviews, held out), a "
                     "file, or '' for the shipped ones (default: the run's directory if it trained on one, "
                     "else '')")  # fmt: skip
    tev.add_argument("--n", type=int, default=128, help="openings to evaluate on, drawn at random (default 128)")
    tev.add_argument("--response-length", type=int, default=24, help="tokens per continuation (default 24)")
    tev.add_argument("--min-response-length", type=int, default=8, help="no stop token before this many (default 8)")
    tev.add_argument("--temperature", type=float, default=0.7, help=gen_help["temperature"])
    tev.add_argument("--greedy", action="store_true", help="the most likely token at every step instead of sampling")
    tev.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                     help="wrap openings in the chat template (default: as the run did, else no)")  # fmt: skip
    tev.add_argument("--seed", type=int, default=0, help="seeds the draw of openings and the sampling")
    tev.add_argument("--batch-size", type=int, default=16, help="continuations sampled at once (default 16)")
    tev.add_argument("--device", default="auto", help="'auto' (a GPU where there is one, else the CPU), 'cpu', 'cuda' or 'cuda:N' (default auto)")
    tev.add_argument("--out", help="JSON output (default RUN/task-eval.json beside RUN/policy)")
    tev.set_defaults(func=cmd_task_eval)

    rm = sub.add_parser("rm", help="reward models from comparisons: train, eval, table")
    rm_sub = rm.add_subparsers(dest="rm_command", required=True, metavar="ACTION")
    rmt = rm_sub.add_parser("train", help="train a reward model on comparisons (Bradley-Terry / best-of-k)")
    rmt.add_argument("--out", required=True, help="output directory: the model in Hugging Face format, metrics.csv")
    rmt.add_argument("--config", help="YAML or JSON file of RewardConfig fields (flags override it)")
    rmt.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    add_config_flags(rmt, RewardConfig)
    rmt.set_defaults(func=cmd_rm_train)
    rme = rm_sub.add_parser("eval", help="pairwise accuracy with a bootstrap CI, against baselines")
    rme.add_argument("--model", required=True, help="a directory written by `wprlhf rm train`")
    rme.add_argument("--data", required=True, help="comparisons (pair CSV / JSONL); with --best-of, scored responses")
    rme.add_argument("--out", help="JSON output (default MODEL/eval-<data name>.json)")
    rme.add_argument("--max-examples", type=int, default=0, help="evaluate on the first N comparisons (0 = all)")
    rme.add_argument("--max-length", type=int, default=None, help="tokens of prompt + response (default: training's)")
    rme.add_argument("--best-of", action="store_true", help="balanced accuracy of 'top-karma response or not'")
    rme.add_argument("--keep-meta", action="store_true", help="evaluate on raw text (meta lines kept)")
    rme.add_argument("--train-data", help="training comparisons for the TF-IDF baseline (default: the model's)")
    rme.set_defaults(func=cmd_rm_eval)
    rmtab = rm_sub.add_parser("table", help="reward models and baselines on the plain and the length-debiased karma "
                              "test split, with CIs and paired bootstraps (docs/data.md's table)")  # fmt: skip
    rmtab.add_argument("--model", action="append", default=[], help="a directory written by `wprlhf rm train`; "
                       "repeat for more rows (the first is the one the others are compared with); none: baselines only")
    rmtab.add_argument("--data", default="../shared/data/writing_prompts",
                       help="the karma data's directory: comparisons_test.csv, comparisons_train.csv.gz, "
                       "prompt_responses.csv.gz (default ../shared/data/writing_prompts)")
    rmtab.add_argument("--out", required=True, help="directory for rm_table.json, rm_table.md, rm_table.csv")
    rmtab.set_defaults(func=cmd_rm_table)
    clf = sub.add_parser("classifier", help="a sentiment classifier (text,label; 1 = positive): train, eval")
    clf_sub = clf.add_subparsers(dest="classifier_command", required=True, metavar="ACTION")
    clt = clf_sub.add_parser("train", help="fine-tune an encoder (default: the embedded MiniLM) on text,label rows",
                             description="Writes the classifier in Hugging Face format, train_config.json, "
                             "metrics.csv, tb/ and eval-heldout.json (with VADER and TF-IDF baselines) into --out.")  # fmt: skip
    clt.add_argument("--out", required=True, help="output directory")
    clt.add_argument("--config", help="YAML or JSON file of ClassifierConfig fields (flags override it)")
    clt.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    add_config_flags(clt, ClassifierConfig)
    clt.set_defaults(func=cmd_classifier_train)
    cle = clf_sub.add_parser("eval", help="accuracy, F1 and a bootstrap CI on labelled text, against baselines")
    cle.add_argument("--model", required=True, help="a directory written by `wprlhf classifier train`")
    cle.add_argument("--data", required=True, help="text,label file (a directory: its imdb_test.csv / test.csv)")
    cle.add_argument("--out", help="JSON output (default MODEL/eval-<data name>.json)")
    cle.add_argument("--max-examples", type=int, default=0, help="evaluate on N texts drawn at random (0 = all)")
    cle.add_argument("--max-length", type=int, default=None, help="tokens per text (default: training's)")
    cle.add_argument("--train-data", help="training texts for the TF-IDF baseline (default: the model's)")
    cle.add_argument("--batch-size", type=int, default=32, help="texts scored at once (default 32)")
    cle.set_defaults(func=cmd_classifier_eval)
    sft = sub.add_parser("sft", help="supervised fine-tuning on prompt -> story (loss on the story only)", description=(
        "Fine-tune a causal LM on karma-scored stories, the loss on response tokens only. Writes config.json, "
        "metrics.csv, tb/, samples.jsonl, loss.png, eval.json and policy/ into --out."))  # fmt: skip
    sft.add_argument("--out", required=True, help="run directory")
    sft.add_argument("--config", help="YAML or JSON file of SFTConfig fields (flags override it)")
    sft.add_argument("--force", action="store_true", help="delete a run already in --out and start over")
    add_config_flags(sft, SFTConfig)
    sft.set_defaults(func=cmd_sft)

    from .methods.dpo import DPOConfig

    dpo = sub.add_parser("dpo", help="direct preference optimisation on a comparisons file (no reward model)",
                         description=("DPO (Rafailov et al. 2023) or IPO (--loss ipo) against the frozen start policy, "
                                      "from a comparisons JSONL or pair CSV. Writes config.json, metrics.csv, tb/, "
                                      "checkpoints/ and policy/ into --out."))  # fmt: skip
    add_run_flags(dpo, DPOConfig)
    dpo.set_defaults(func=cmd_dpo)

    from .pipelines.compare import CompareConfig

    cmp = sub.add_parser("compare", help="PPO, RLOO, GRPO, DPO and best-of-n on the same preferences and budget",
                         description=("Labels start-policy samples (a simulated labeler or --comparisons), trains a "
                                      "reward model on them, trains each method with the same budget of responses, "
                                      "and judges each against the start policy on held-out prompts: table.md, "
                                      "report.json, over_optimisation.png in --out."))  # fmt: skip
    add_run_flags(cmp, CompareConfig)
    cmp.set_defaults(func=cmd_compare)

    demo = sub.add_parser("demo", help="the whole RLHF pipeline offline on the embedded models, with a report",
                          description="Sample from SmolLM2 -> simulated comparisons -> MiniLM reward model -> PPO -> the "
                          "judge compares the final and start policies on held-out prompts -> report.html. About 25 "
                          "minutes on 2 CPU cores; --quick about 4.")  # fmt: skip
    demo.add_argument("--out", required=True, help="run directory")
    demo.add_argument("--quick", action="store_true", help="a few-minute run (smaller sizes, same pipeline)")
    demo.add_argument("--data", help="prompts: a prompt file, a prompt/response data set (directory or hub id)")
    demo.add_argument("--policy", help="start policy (default smollm2)")
    demo.add_argument("--labeler", help="simulated labeler, e.g. sim:sentiment (default), sim:relevance, sim:rm:DIR")
    demo.add_argument("--reward-model", help="reward-model backbone or a trained reward model to fine-tune")
    demo.add_argument("--config", help="YAML or JSON file of LoopConfig fields (see `wprlhf loop --help`)")
    demo.add_argument("--seed", type=int, help="seeds every phase of the demo (default: its config's)")
    demo.add_argument("--resume", action="store_true", help="continue after the last finished phase")
    demo.add_argument("--allow-changed-inputs", action="store_true", help=ALLOW_CHANGED_HELP)
    demo.add_argument("--force", action="store_true", help="delete a run already in --out and start over")
    demo.set_defaults(func=cmd_demo)

    loop = sub.add_parser("loop", help="rounds of sample -> label -> reward model -> PPO, judged against the start",
                          description="The iterative RLHF loop. Writes round-N/ (samples, labels, rm/, eval.json), "
                          "ppo/ and loop_metrics.csv into --out; a killed loop resumes with --resume.")  # fmt: skip
    add_run_flags(loop, LoopConfig)
    loop.set_defaults(func=cmd_loop)

    sto = sub.add_parser("stories", help=("the main job: RLHF on r/WritingPrompts (split, reward models, DPO or "
                                          "PPO, best-of-n, judges)"),
                         description="Writing-prompts RLHF from karma comparisons, judged on held-out prompts by a judge "
                         "reward model, a story rule, relevance and diversity. Phases: " + ", ".join(PHASES) + ".")  # fmt: skip
    sto.add_argument("--quick", action="store_true", help="tiny sizes everywhere: a few minutes, to try the pipeline")
    sto.add_argument("--until", choices=PHASES, help="stop after this phase (resume later with --resume)")
    add_run_flags(sto, StoriesConfig)
    sto.set_defaults(func=cmd_stories)

    evl = sub.add_parser("eval", help="a policy against another on held-out prompts, by every judge; blind pairs for people",
                         description="Judge win rate (with --judge), story share, relevance, distinct-n, repetition, meta "
                         "lines and KL, each with a 95 % CI over prompts. --blind-db queues the pairs, sides shuffled, "
                         "for people on the labeling page; --blind-results DB reports their labels.")  # fmt: skip
    evl.add_argument("--out", default="", help="report JSON (default eval.json; a Markdown table beside it)")
    evl.add_argument("--config", help="YAML or JSON file of EvalConfig fields (flags override it)")
    evl.add_argument("--blind-db", default="", help="also queue the pairs blind in this labeling database")
    evl.add_argument("--blind-results", default="", metavar="DB", help="report people's labels of a blind database")
    add_config_flags(evl, EvalConfig)
    evl.set_defaults(func=cmd_eval)

    rep = sub.add_parser("report", help="an offline HTML report with plots of a ppo or loop run directory",
                         description="Plots (PNG) and one self-contained HTML page from a run's metric files: reward, "
                         "judge and KL per PPO step, β, entropy, length, RM accuracy, win rate, samples, config.")  # fmt: skip
    rep.add_argument("run_dir", help="the --out of a `wprlhf ppo` or `wprlhf loop` run")
    rep.add_argument("--out", help="HTML file to write (default RUN_DIR/report.html); PNGs go beside it")
    rep.set_defaults(func=cmd_report)

    lab = sub.add_parser("label", help="human labels: queue samples, serve the labeling page, export comparisons")
    lab_sub = lab.add_subparsers(dest="label_command", required=True, metavar="ACTION")
    las = lab_sub.add_parser("serve", help="serve the labeling page (beyond loopback it needs an access token)")
    las.add_argument("--db", required=True, help="the SQLite labels file (created if absent)")
    las.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    las.add_argument("--port", type=int, default=8765, help="the port the page listens on (default 8765)")
    las.add_argument("--token", help="shared access token to require (default: none on loopback or with invites, a "
                                      "random one otherwise); at least 16 characters, 10 different. Shown by `ps`: "
                                      "prefer --token-file or the WPRLHF_LABEL_TOKEN variable")  # fmt: skip
    las.add_argument("--token-file", metavar="FILE", help="read the shared token from this file's first line")
    las.add_argument("--labels-per-comparison", type=int, help="labelers per comparison (default: the file's, 1)")
    las.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                     help="another host name the page is opened by, e.g. a TLS proxy's public name (repeatable; "
                          "the page then needs a token)")  # fmt: skip
    las.add_argument("--instructions", metavar="FILE",
                     help="labeling guidelines (Markdown or plain text) shown before the first item and on demand")
    las.set_defaults(func=_labeling(cmd_label_serve))
    laa = lab_sub.add_parser("add", help="queue the output of `wprlhf sample` for labeling")
    laa.add_argument("--db", required=True, help="the SQLite labels file (created if absent)")
    laa.add_argument("samples", nargs="+", help='JSONL: {"prompt": str, "responses": [2-4 str], ...} per line')
    laa.set_defaults(func=_labeling(cmd_label_add))
    lae = lab_sub.add_parser("export", help="write the labels as a comparisons JSONL (for `wprlhf rm train --data`)")
    lae.add_argument("--db", required=True, help="the SQLite labels file to export from")
    lae.add_argument("--out", required=True, help="output JSONL, one line per label")
    lae.set_defaults(func=_labeling(cmd_label_export))
    lai = lab_sub.add_parser("invite", help="print a labeler's own link (their name comes from it), or the lead's")
    lai.add_argument("--db", required=True, help="the SQLite labels file (created if absent)")
    lai.add_argument("name", help="the labeler's name (compared case- and width-blind)")
    lai.add_argument("--lead", action="store_true", help="a link to the lead's view (/lead) instead")
    lai.add_argument("--url", default="http://127.0.0.1:8765/", help="the page's address as labelers open it")
    lai.set_defaults(func=_labeling(cmd_label_invite))
    lar = lab_sub.add_parser("revoke", help="stop an invite link; the labels given through it stay")
    lar.add_argument("--db", required=True, help="the SQLite labels file")
    lar.add_argument("name", help="whose link to stop")
    lar.set_defaults(func=_labeling(cmd_label_revoke))
    lat = lab_sub.add_parser("status", help="print done / queued comparisons and labeler agreement")
    lat.add_argument("--db", required=True, help="the SQLite labels file to report on")
    lat.add_argument("--json", action="store_true", help="print the numbers as JSON")
    lat.add_argument("--html", metavar="FILE", help="also write the lead's view (progress and speed per labeler, "
                                                     "kappa, stuck items, review queue) as one HTML file")  # fmt: skip
    lat.set_defaults(func=_labeling(cmd_label_status))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Before any tensor: steps then reuse the memory earlier steps freed (allocator.py says why and what it costs).
    # Not for the commands that run no model: the labeling server and the report.
    if args.command not in ("label", "report"):
        keep_freed_memory()
    opened_before = _process_group_open()
    try:
        args.func(args)
    except UserError as err:
        print(f"wprlhf {args.command}: error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"wprlhf {args.command}: interrupted (runs resume with --resume)", file=sys.stderr)
        return 130
    else:
        code = 0
    # Under `accelerate launch`/torchrun the command opened a process group: leave it before exit, since a group
    # still open when the interpreter shuts down can abort in gloo's teardown and turn a finished run into a
    # non-zero exit. Only on these orderly ways out (a crash on one rank must not wait on the others), and only a
    # group this command opened (not a caller's).
    if not opened_before and _process_group_open():
        import torch.distributed as dist

        dist.destroy_process_group()
    return code


def _process_group_open() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


if __name__ == "__main__":
    sys.exit(main())
