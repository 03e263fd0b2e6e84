"""Creates IAM roles in the local STS peer for tests and the demo (run with admin credentials).

    iam.py create-role --name NAME --principal ARN [--external-id ID] [--no-tag-session] [--allow-assume] [--allow ACTION ...]
    iam.py create-user --name NAME [--allow ACTION ...]

create-role prints the role ARN. The trust policy allows sts:AssumeRole (and sts:TagSession unless
--no-tag-session) for PRINCIPAL, with an sts:ExternalId condition when --external-id is given.
"""
import argparse
import json

import boto3


def create_role(args):
    iam = boto3.client("iam")
    actions = ["sts:AssumeRole"] + ([] if args.no_tag_session else ["sts:TagSession"])
    statement = {"Effect": "Allow", "Principal": {"AWS": args.principal}, "Action": actions}
    allowed = ["sts:GetCallerIdentity"] + (["sts:AssumeRole", "sts:TagSession"] if args.allow_assume else []) + args.allow
    if args.external_id:
        statement["Condition"] = {"StringEquals": {"sts:ExternalId": args.external_id}}
    trust = json.dumps({"Version": "2012-10-17", "Statement": [statement]})
    try:
        role = iam.create_role(RoleName=args.name, AssumeRolePolicyDocument=trust, MaxSessionDuration=args.max_session_duration)["Role"]
    except iam.exceptions.EntityAlreadyExistsException:
        # Idempotent for re-runs (the demo): keep the role, refresh its trust policy.
        iam.update_assume_role_policy(RoleName=args.name, PolicyDocument=trust)
        role = iam.get_role(RoleName=args.name)["Role"]
    # What the role's sessions may do: ask who they are (and, for a hub, assume the next role).
    iam.put_role_policy(
        RoleName=args.name,
        PolicyName="whoami",
        PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": allowed, "Resource": "*"}]}
        ),
    )
    print(role["Arn"])


def create_user(args):
    """An IAM user with long-term keys (a team's own identity); prints its access key ID and
    secret access key, one per line."""
    iam = boto3.client("iam")
    iam.create_user(UserName=args.name)
    allowed = ["sts:GetCallerIdentity"] + args.allow
    iam.put_user_policy(
        UserName=args.name,
        PolicyName="allowed",
        PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": allowed, "Resource": "*"}]}
        ),
    )
    key = iam.create_access_key(UserName=args.name)["AccessKey"]
    print(key["AccessKeyId"])
    print(key["SecretAccessKey"])


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create-role")
    create.add_argument("--name", required=True)
    create.add_argument("--principal", required=True)
    create.add_argument("--external-id")
    create.add_argument("--no-tag-session", action="store_true")
    create.add_argument("--allow-assume", action="store_true", help="let the role assume other roles (a chain's hub)")
    create.add_argument("--allow", action="append", default=[], metavar="ACTION", help="one more action the role's sessions may call (e.g. ecr:GetAuthorizationToken)")
    create.add_argument("--max-session-duration", type=int, default=43200)
    user = sub.add_parser("create-user")
    user.add_argument("--name", required=True)
    user.add_argument("--allow", action="append", default=[], metavar="ACTION", help="an action the user may call (e.g. sts:GetSessionToken)")
    args = parser.parse_args()
    if args.command == "create-role":
        create_role(args)
    elif args.command == "create-user":
        create_user(args)


if __name__ == "__main__":
    main()
