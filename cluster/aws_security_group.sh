#!/usr/bin/env bash
# Create the security group every node of ray_cluster.yaml uses: SSH (22) only from the address range
# you administer from, and all traffic between the cluster's own nodes; nothing else is open (reach
# the dashboard through `ray dashboard ray_cluster.yaml`, an SSH tunnel). Without a group of its own,
# Ray's launcher creates one that opens SSH to 0.0.0.0/0.
#
#   cluster/aws_security_group.sh 203.0.113.7/32 [VPC_ID]     # prints the group id
#   sed -i "s/sg-SET-WITH-cluster-aws_security_group-sh/<that id>/" ray_cluster.yaml
set -euo pipefail
cidr="${1:?usage: cluster/aws_security_group.sh ADMIN_CIDR (e.g. 203.0.113.7/32) [VPC_ID]}"
case "$cidr" in
  0.0.0.0/0|::/0) echo "refusing $cidr: give the address range you administer from, e.g. your IP/32" >&2; exit 2 ;;
  */*) ;;
  *) echo "$cidr is not a CIDR range (ADDRESS/PREFIX)" >&2; exit 2 ;;
esac
region="${AWS_REGION:-us-east-1}"  # the region ray_cluster.yaml names
vpc="${2:-$(aws ec2 describe-vpcs --region "$region" --filters Name=is-default,Values=true \
  --query 'Vpcs[0].VpcId' --output text)}"
sg=$(aws ec2 create-security-group --region "$region" --group-name diffkd-ray --vpc-id "$vpc" \
  --description "diffkd Ray cluster: SSH from $cidr, all traffic between its nodes" --query GroupId --output text)
aws ec2 authorize-security-group-ingress --region "$region" --group-id "$sg" --ip-permissions \
  "IpProtocol=tcp,FromPort=22,ToPort=22,IpRanges=[{CidrIp=$cidr,Description=administrators}]" \
  "IpProtocol=-1,UserIdGroupPairs=[{GroupId=$sg,Description=cluster nodes}]" > /dev/null
echo "$sg"
